// `deno task mutate`: deliberate breakages that the suite must catch.
//
// Each mutation names a source file, a piece of its text and what to put
// there instead, and the test files that must fail once it is made. The
// runner copies the repository to a scratch folder per mutation (the
// working tree is never touched), applies the change, runs those tests,
// and reports a mutation whose tests still pass: a test that weakened
// until it no longer guards what it claims shows up here before it lands.
//
//   deno task mutate            every mutation
//   deno task mutate zero-check only those whose name contains the text
//
// Exit status: 0 when every mutation was caught, 1 otherwise.

/** One deliberate breakage. */
interface Mutation {
  /** A short name, for the report and for filtering. */
  name: string;
  /** The file to change, relative to the repository root. */
  file: string;
  /** Text that must occur exactly once in the file. */
  find: string;
  /** What it becomes. */
  replace: string;
  /** Test files (relative to the root) of which at least one must fail. */
  tests: string[];
  /** Only the tests whose names match (deno test --filter). */
  filter?: string;
}

const MUTATIONS: Mutation[] = [
  {
    name: "zero-check skips one word in four",
    file: "drivers/_binary.ts",
    find: "(words[w] | words[w + 1] | words[w + 2] | words[w + 3] |",
    replace: "(words[w] | words[w + 1] | words[w + 2] |",
    tests: ["tests/convert_test.ts"],
  },
  {
    name: "repeated flag keeps only its last value",
    file: "cli.ts",
    find: "((values[name] ??= []) as (string | boolean)[]).push(value);",
    replace: "values[name] = [value as string];",
    tests: ["tests/cli_test.ts"],
    filter: "spellings",
  },
  {
    name: "vhd differencing prefers the parent's name over its locators",
    file: "drivers/vpc.ts",
    find:
      "function chooseBackingFile(header: DynamicHeader): string | undefined {",
    replace:
      "function chooseBackingFile(header: DynamicHeader): string | undefined {\n  if (header.parentName) return header.parentName;",
    tests: ["tests/vpc_test.ts"],
    filter: "locators",
  },
  {
    name: "a truncated flat vmdk extent is zero-padded instead of refused",
    file: "drivers/vmdk.ts",
    find: "if (end > file.size) {",
    replace: "if (end > file.size + 1e15) {",
    tests: ["tests/vmdk_test.ts"],
    filter: "flat extent shorter",
  },
  {
    name: "the backing-folder check matches by string prefix",
    file: "streams/file.ts",
    find:
      "  return outer.length <= inner.length &&\n    outer.every((part, i) => part === inner[i]);",
    replace:
      '  return ("/" + inner.join("/")).startsWith("/" + outer.join("/"));',
    tests: ["tests/file_safety_test.ts"],
    filter: "vm-evil",
  },
  {
    name: "the service forgets 172.16/12",
    file: "streams/_address.ts",
    find: 'range([172, 16], 12, "private 172.16.0.0/12"),',
    replace: "",
    tests: ["tests/address_test.ts", "tests/service_test.ts"],
  },
  {
    name: "the service forgets fc00::/7 and fe80::/10",
    file: "streams/_address.ts",
    find:
      'range([0xfc], 7, "unique local fc00::/7"),\n  range([0xfe, 0x80], 10, "link-local fe80::/10"),',
    replace: "",
    tests: ["tests/address_test.ts", "tests/service_test.ts"],
  },
];

const root = new URL("../", import.meta.url).pathname;
const wanted = Deno.args.join(" ").toLowerCase();
const chosen = MUTATIONS.filter((m) => m.name.toLowerCase().includes(wanted));

/** Copies the repository (without .git, dist and caches) to a new folder. */
async function scratchCopy(): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "vdisk-mutate-" });
  const copy = new Deno.Command("tar", {
    args: [
      "-C",
      root,
      "--exclude=.git",
      "--exclude=dist",
      "--exclude=node_modules",
      "-cf",
      "-",
      ".",
    ],
    stdout: "piped",
  }).spawn();
  const extract = new Deno.Command("tar", {
    args: ["-C", dir, "-xf", "-"],
    stdin: "piped",
  }).spawn();
  await copy.stdout.pipeTo(extract.stdin);
  await copy.status;
  await extract.status;
  return dir;
}

let survived = 0;
for (const m of chosen) {
  const dir = await scratchCopy();
  try {
    const path = `${dir}/${m.file}`;
    const text = await Deno.readTextFile(path);
    const at = text.indexOf(m.find);
    if (at < 0 || text.indexOf(m.find, at + 1) >= 0) {
      console.log(
        `STALE    ${m.name}: the text to change is not in ${m.file} once`,
      );
      survived++;
      continue;
    }
    await Deno.writeTextFile(
      path,
      text.slice(0, at) + m.replace + text.slice(at + m.find.length),
    );
    const args = ["test", "--allow-all", "--no-check", ...m.tests];
    if (m.filter) args.push("--filter", m.filter);
    const result = await new Deno.Command(Deno.execPath(), {
      args,
      cwd: dir,
      stdout: "null",
      stderr: "null",
      env: { NO_COLOR: "1" },
    }).output();
    if (result.success) {
      console.log(`SURVIVED ${m.name}: ${m.tests.join(", ")} still pass`);
      survived++;
    } else {
      console.log(`caught   ${m.name}`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}
console.log(
  `${chosen.length - survived} of ${chosen.length} mutations caught`,
);
Deno.exit(survived ? 1 : 0);
