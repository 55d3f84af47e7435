/**
 * A forward-only window over compressed bytes that arrive in pieces, for
 * the streaming decoders (xz, bzip2, zstd): a decoder asks for at least
 * `n` bytes ahead of its position, reads them from `bytes` at `start`,
 * and skips what it has used. Memory is what the decoder asks to see
 * ahead, never the whole input.
 *
 * This module is browser compatible.
 *
 * @module
 */

/** Where a feed's pieces come from: `null` once there are no more. */
export type Pull = () => Promise<Uint8Array | null>;

/** A window over a forward-only byte stream. */
export class ByteFeed {
  /** The buffered bytes; the unread ones are `bytes[start..end)`. */
  bytes: Uint8Array = new Uint8Array(0);
  /** First unread byte in `bytes`. */
  start = 0;
  /** One past the last buffered byte in `bytes`. */
  end = 0;
  /** Bytes skipped before `bytes[start]` since the stream began. */
  consumed = 0;
  /** True once the pull function has said there is no more. */
  eof = false;
  #pull: Pull;

  /** A feed over what `pull` hands out, in order. */
  constructor(pull: Pull) {
    this.#pull = pull;
  }

  /** Unread bytes buffered. */
  get available(): number {
    return this.end - this.start;
  }

  /**
   * Buffers at least `n` unread bytes unless the stream ends first;
   * returns how many are buffered (fewer than `n` only at the end).
   */
  async ensure(n: number): Promise<number> {
    while (this.end - this.start < n && !this.eof) {
      const piece = await this.#pull();
      if (piece === null) {
        this.eof = true;
        break;
      }
      if (piece.length === 0) continue;
      const unread = this.end - this.start;
      if (this.start + unread + piece.length > this.bytes.length) {
        if (unread + piece.length > this.bytes.length) {
          // Grow: the decoder asked to see more than fits.
          const grown = new Uint8Array(
            Math.max(unread + piece.length, this.bytes.length * 2, 1 << 16),
          );
          grown.set(this.bytes.subarray(this.start, this.end));
          this.bytes = grown;
        } else {
          this.bytes.copyWithin(0, this.start, this.end);
        }
        this.start = 0;
        this.end = unread;
      }
      this.bytes.set(piece, this.end);
      this.end += piece.length;
    }
    return this.end - this.start;
  }

  /** Marks `n` buffered bytes as read. */
  skip(n: number): void {
    if (n > this.end - this.start) {
      throw new RangeError(`skip of ${n} bytes, ${this.available} buffered`);
    }
    this.start += n;
    this.consumed += n;
  }

  /** Whether the stream has no more bytes (buffered or to come). */
  async atEnd(): Promise<boolean> {
    return (await this.ensure(1)) === 0;
  }
}
