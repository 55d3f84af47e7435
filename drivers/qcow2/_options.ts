/**
 * The `-o` options qcow2 takes when written, declared apart from the code
 * that writes (`layout.ts`, `writable.ts`), so that the driver's table
 * carries them while reading loads none of it.
 *
 * This module is browser compatible.
 *
 * @module
 */

import type { OptionSpec } from "../../streams/types.ts";

/** The `-o` options of qcow2 creation and conversion (qemu-img's names). */
export const QCOW2_OPTIONS: readonly OptionSpec[] = [
  {
    name: "compat",
    help: "compatibility level: version 2 (0.10) or 3 (1.1)",
    values: ["0.10", "1.1", "v2", "v3"],
    default: "1.1",
  },
  {
    name: "cluster_size",
    help: "cluster size",
    accepts: "a power of two from 512 to 2M",
    default: "64k",
  },
  {
    name: "lazy_refcounts",
    help: "set the lazy refcounts bit (compat 1.1)",
    values: ["on", "off"],
    default: "off",
  },
  {
    name: "refcount_bits",
    help: "width of a refcount (16 only with compat 0.10)",
    values: ["1", "2", "4", "8", "16", "32", "64"],
    default: "16",
  },
  {
    name: "extended_l2",
    help:
      "extended L2 entries: 32 subclusters a cluster (16k clusters at least)",
    values: ["on", "off"],
    default: "off",
  },
  {
    name: "compression_type",
    help: "compression of -c clusters (zstd needs compat 1.1)",
    values: ["zlib", "zstd"],
    default: "zlib",
  },
  {
    name: "data_file",
    help:
      "external data file holding the guest data at guest offsets (compat 1.1)",
    accepts: "a file name",
  },
  {
    name: "data_file_raw",
    help: "the data file is also a raw image of the disk (needs data_file)",
    values: ["on", "off"],
    default: "off",
  },
  {
    name: "preallocation",
    help: "metadata: every cluster allocated (its bytes left sparse)",
    values: ["off", "metadata"],
    default: "off",
  },
  {
    name: "encrypt.format",
    help: "encrypt with the passphrase of --key-file",
    values: ["luks", "aes"],
  },
  {
    name: "encryption",
    help: "the old name of encrypt.format=aes",
    values: ["on", "off"],
    default: "off",
  },
  {
    name: "encrypt.cipher-alg",
    help: "LUKS cipher",
    values: ["aes-128", "aes-192", "aes-256"],
    default: "aes-256",
  },
  {
    name: "encrypt.cipher-mode",
    help: "LUKS cipher mode",
    values: ["xts", "cbc"],
    default: "xts",
  },
  {
    name: "encrypt.ivgen-alg",
    help: "LUKS IV generator",
    values: ["plain64", "plain"],
    default: "plain64",
  },
  {
    name: "encrypt.hash-alg",
    help: "LUKS PBKDF2 and anti-forensic hash",
    values: ["sha1", "sha256", "sha384", "sha512"],
    default: "sha256",
  },
  {
    name: "encrypt.iter-time",
    help: "milliseconds the key slot's PBKDF2 takes (1000 iterations at least)",
    accepts: "a whole number of milliseconds",
    default: "2000",
  },
  {
    name: "backing_file",
    help: "backing file (create -b)",
    accepts: "a file name",
  },
  {
    name: "backing_fmt",
    help: "backing file format (create -F)",
    accepts: "a format name",
  },
  {
    name: "compress",
    help: "set by convert -c when it creates the image",
    values: ["on", "off"],
  },
];
