/**
 * Loaded before every test module (`deno task test` passes it with
 * `--preload`): the run is quiet unless something fails. The examples in
 * the JSDoc (run as doc tests) and a few tests print what they show a
 * reader (`console.log(image.format)`, a measured peak RSS on
 * `console.error`); those lines
 * came out as "post-test output", 200 of them. Failures still print in
 * full: assertion messages and stacks do not go through `console.log`.
 * `VDISK_TEST_VERBOSE=1 deno task test` prints everything again.
 */
if (!Deno.env.get("VDISK_TEST_VERBOSE")) {
  const silent = () => {};
  console.log = silent;
  console.info = silent;
  console.debug = silent;
  console.warn = silent;
  console.error = silent;
}
