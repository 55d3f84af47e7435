import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  isAddress,
  parseIPv4,
  parseIPv6,
  privateRange,
} from "../streams/_address.ts";

Deno.test("IPv4 addresses are read in every form inet_aton and URLs accept", () => {
  for (
    const text of [
      "127.0.0.1",
      "127.1",
      "127.0.1",
      "2130706433",
      "0x7f000001",
      "0x7f.0.0.1",
      "0177.0.0.1",
      "017700000001",
      "127.0.0.1.",
    ]
  ) {
    assertEquals(Array.from(parseIPv4(text)!), [127, 0, 0, 1], text);
  }
  for (const text of ["256.0.0.1", "1.2.3.4.5", "4294967296", "1..2", "a.b"]) {
    assertEquals(parseIPv4(text), undefined, text);
  }
});

Deno.test("IPv6 addresses are read with ::, dotted tails, brackets and zones", () => {
  const loop = [...new Array(15).fill(0), 1];
  for (const text of ["::1", "[::1]", "0:0:0:0:0:0:0:1", "::0:1", "::1%lo"]) {
    assertEquals(Array.from(parseIPv6(text)!), loop, text);
  }
  const mapped = [...new Array(10).fill(0), 255, 255, 127, 0, 0, 1];
  for (
    const text of [
      "::ffff:127.0.0.1",
      "::ffff:7f00:1",
      "0:0:0:0:0:ffff:7f00:1",
      "0:0:0:0:0:ffff:127.0.0.1",
      "0000:0000:0000:0000:0000:FFFF:7F00:0001",
    ]
  ) {
    assertEquals(Array.from(parseIPv6(text)!), mapped, text);
  }
  for (
    const text of [
      "1:2:3:4:5:6:7",
      "1::2::3",
      "::ffff:1.2.3.256",
      "12345::",
      ":",
    ]
  ) {
    assertEquals(parseIPv6(text), undefined, text);
  }
});

Deno.test("every internal range is refused, in every spelling", () => {
  const cases: [string, RegExp][] = [
    ["127.0.0.1", /loopback/],
    ["127.1", /loopback/],
    ["2130706433", /loopback/],
    ["0x7f.1", /loopback/],
    ["localhost", /localhost/],
    ["LOCALHOST.", /localhost/],
    ["x.localhost", /localhost/],
    ["0.0.0.0", /this network/],
    ["0.1.2.3", /this network/],
    ["10.0.0.1", /private 10/],
    ["100.64.0.1", /CGNAT/],
    ["100.127.255.255", /CGNAT/],
    ["169.254.169.254", /link-local/],
    ["172.16.0.1", /private 172/],
    ["172.31.255.255", /private 172/],
    ["192.168.1.1", /private 192/],
    ["192.0.0.170", /IETF/],
    ["198.18.0.1", /benchmarking/],
    ["224.0.0.1", /multicast/],
    ["255.255.255.255", /reserved/],
    ["::", /unspecified/],
    ["[::]", /unspecified/],
    ["::1", /loopback ::1/],
    ["[0:0:0:0:0:0:0:1]", /loopback ::1/],
    ["::ffff:127.0.0.1", /loopback 127.*IPv4-mapped/],
    ["[::ffff:7f00:1]", /loopback 127.*IPv4-mapped/],
    ["[0:0:0:0:0:ffff:7f00:1]", /loopback 127.*IPv4-mapped/],
    ["::ffff:169.254.169.254", /link-local.*IPv4-mapped/],
    ["::ffff:a9fe:a9fe", /link-local.*IPv4-mapped/],
    ["::ffff:10.0.0.1", /private 10.*IPv4-mapped/],
    ["::ffff:0:127.0.0.1", /loopback.*IPv4-translated/],
    ["::127.0.0.1", /loopback.*IPv4-compatible/],
    ["::7f00:1", /loopback.*IPv4-compatible/],
    ["64:ff9b::127.0.0.1", /loopback.*NAT64/],
    ["64:ff9b::a9fe:a9fe", /link-local.*NAT64/],
    ["64:ff9b:1::1", /local NAT64/],
    ["2002:7f00:1::", /loopback.*6to4/],
    ["2002:c0a8:101::1", /private 192.*6to4/],
    ["fec0::1", /site-local/],
    ["feff::1", /site-local/],
    ["fc00::1", /unique local/],
    ["fd12:3456::1", /unique local/],
    ["fe80::1", /link-local fe80/],
    ["fe80::1%eth0", /link-local fe80/],
    ["febf::1", /link-local fe80/],
    ["ff02::1", /multicast/],
    ["2001:db8::1", /documentation/],
    ["2001:0:4136:e378::1", /Teredo/],
    ["100::1", /discard/],
    ["::ffff:127.000.0.1", /not a well-formed address/],
    ["127.0.0.256", /not a well-formed address/],
    ["0x7f.0.0.1.2", /not a well-formed address/],
    ["[::1", /not a well-formed address/],
  ];
  for (const [host, why] of cases) {
    const found = privateRange(host);
    assertTrue(found !== undefined, `${host} passed as public`);
    assertMatch(found!, why, host);
  }
});

Deno.test("public addresses and names pass", () => {
  for (
    const host of [
      "93.184.216.34",
      "8.8.8.8",
      "172.32.0.1",
      "172.15.255.255",
      "100.128.0.1",
      "169.253.0.1",
      "2606:4700::1111",
      "[2a00:1450:4001::200e]",
      "::ffff:8.8.8.8",
      "64:ff9b::8.8.8.8",
      "2002:808:808::1",
      "images.example.com",
      "localhost.example.com",
      "0xford.example.com",
    ]
  ) {
    assertEquals(privateRange(host), undefined, host);
  }
  assertTrue(isAddress("[::1]") && isAddress("10.1") && !isAddress("a.b"));
});

Deno.test("URL hostnames reach the check in the parser's normal form, and are refused", () => {
  for (
    const url of [
      "http://[0:0:0:0:0:ffff:127.0.0.1]/",
      "http://[::ffff:7f00:1]:8080/",
      "http://0x7f.1/",
      "http://017700000001/",
      "http://[::127.0.0.1]/",
      "http://[64:ff9b::7f00:1]/",
      "http://[2002:a9fe:a9fe::]/",
    ]
  ) {
    assertTrue(privateRange(new URL(url).hostname) !== undefined, url);
  }
});
