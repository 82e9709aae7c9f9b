'use strict';
// Sealed files (docs/PROTOCOL.md, "Sealed files"; protocol/sealed_file.py), the open side:
// AES-256-GCM data at rest as Tink's AES-GCM-HKDF streaming AEAD (AES256_GCM_HKDF_1MB) with
// a short encloud header as associated data.
//
//   sealed    = header || tink
//   header    = "ENCLSEAL" || u8(version = 1) || u8(len(key_id)) || key_id        (ASCII)
//   tink      = u8(40) || salt (32) || nonce_prefix (7) || segment_0 || ... || segment_n
//   K_file    = HKDF-SHA256(ikm = K, salt = salt, info = header, 32 bytes)
//   segment_i = AES-256-GCM(K_file, nonce_prefix || u32be(i) || u8(i == n), plaintext_i)
//
// Ciphertext segments are 1 MiB (the first 40 bytes shorter, for Tink's header), the last one
// shorter or just its tag. A segment is the last one exactly when nothing follows it, so the
// reader looks one byte ahead. Every segment is bound to the file (the salt picks K_file), the
// header (HKDF info), its position (the counter) and being last or not (the flag): a
// reordered, dropped, truncated, spliced or cross-file segment does not open.
//
// openSealedFile streams: it holds one ciphertext segment, its plaintext and what the input
// handed over beyond it (one chunk), about two segments whatever the file's size, and writes a
// segment's plaintext only once that segment authenticated.
const crypto = require('node:crypto');
const { finished } = require('node:stream/promises');
const E = require('./errors');

const MAGIC = Buffer.from('ENCLSEAL', 'ascii');
const VERSION = 1;
const KEY_LENGTH = 32;
/** Ciphertext bytes per segment (Tink's AES256_GCM_HKDF_1MB). */
const SEGMENT_SIZE = 1 << 20;
const TAG_LENGTH = 16;
const NONCE_PREFIX_LENGTH = 7;
const TINK_HEADER_LENGTH = 1 + KEY_LENGTH + NONCE_PREFIX_LENGTH; // 40
const KEY_ID_PATTERN = /^[A-Za-z0-9._:/-]{1,128}$/;
const MAX_SEGMENTS = 2 ** 32;

/** A key id: 1 to 128 of A-Z a-z 0-9 . _ : / - (TypeError/RangeError otherwise). */
function checkKeyId(keyId) {
  if (typeof keyId !== 'string') throw new TypeError('a key id is a string');
  if (!KEY_ID_PATTERN.test(keyId)) {
    throw new RangeError('a key id is 1 to 128 characters of A-Z a-z 0-9 . _ : / -');
  }
  return keyId;
}

/** The encloud header of a sealed file: "ENCLSEAL" || u8(version) || u8(len) || key id. */
function sealedHeader(keyId, version = VERSION) {
  const id = Buffer.from(checkKeyId(keyId), 'ascii');
  return Buffer.concat([MAGIC, Buffer.from([version, id.length]), id]);
}

function checkKey(key) {
  if (!(key instanceof Uint8Array)) throw new TypeError('a sealed-file key is a Buffer of 32 bytes');
  if (key.length !== KEY_LENGTH) throw new RangeError('a sealed-file key is 32 bytes (AES-256)');
  return Buffer.from(key);
}

/** K_file = HKDF-SHA256(ikm = key, salt, info = the encloud header), 32 bytes. */
function fileKey(key, salt, header) {
  return Buffer.from(crypto.hkdfSync('sha256', checkKey(key), salt, header, KEY_LENGTH));
}

/** nonce_prefix (7) || u32be(index) || u8(last ? 1 : 0). */
function segmentNonce(prefix, index, last) {
  if (index >= MAX_SEGMENTS) throw new E.SealedFileFormatError('a sealed file has at most 2^32 segments');
  const nonce = Buffer.alloc(NONCE_PREFIX_LENGTH + 5);
  Buffer.from(prefix).copy(nonce, 0, 0, NONCE_PREFIX_LENGTH);
  nonce.writeUInt32BE(index, NONCE_PREFIX_LENGTH);
  nonce[NONCE_PREFIX_LENGTH + 4] = last ? 1 : 0;
  return nonce;
}

/** A key file's 32-byte key: 32 raw bytes, or 64 hex digits (ASCII whitespace around allowed). */
function readKeyFile(data) {
  if (!(data instanceof Uint8Array)) throw new TypeError("a key file's contents are a Buffer");
  const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  // Python's bytes.strip(): space, \t, \n, \v, \f, \r.
  const space = (c) => c === 0x20 || (c >= 0x09 && c <= 0x0d);
  if (bytes.length === KEY_LENGTH) {
    // All hex digits or whitespace: a short hex key more likely than 32 random bytes.
    const hexish = (c) => space(c) || (c >= 0x30 && c <= 0x39) || ((c | 0x20) >= 0x61 && (c | 0x20) <= 0x66);
    if (bytes.every(hexish)) {
      throw new RangeError('a 32-byte key file of hex digits: write the key as 64 hex digits');
    }
    return Buffer.from(bytes);
  }
  let start = 0;
  let end = bytes.length;
  while (start < end && space(bytes[start])) start++;
  while (end > start && space(bytes[end - 1])) end--;
  const text = bytes.subarray(start, end).toString('latin1');
  if (/^[0-9a-fA-F]{64}$/.test(text)) return Buffer.from(text, 'hex');
  throw new RangeError('a key file holds 32 raw bytes or 64 hex digits');
}

/** Bytes from a readable stream or an (async) iterable of Buffers, read in exact amounts. */
class ByteReader {
  constructor(input) {
    if (input instanceof Uint8Array) this.it = [input][Symbol.iterator]();
    else if (input && typeof input[Symbol.asyncIterator] === 'function') this.it = input[Symbol.asyncIterator]();
    else if (input && typeof input !== 'string' && typeof input[Symbol.iterator] === 'function') {
      this.it = input[Symbol.iterator]();
    } else throw new TypeError('the input is a readable stream or an (async) iterable of Buffers');
    this.chunks = [];
    this.head = 0; // chunks before head are consumed
    this.buffered = 0; // bytes held and not yet read
    this.done = false;
  }

  async fill(n) {
    while (this.buffered < n && !this.done) {
      const { value, done } = await this.it.next();
      if (done) {
        this.done = true;
        break;
      }
      if (!(value instanceof Uint8Array)) {
        throw new TypeError('the input yields Buffers (a stream without an encoding), not ' + typeof value);
      }
      if (!value.length) continue;
      if (this.head > 64 && this.head * 2 > this.chunks.length) {
        this.chunks = this.chunks.slice(this.head);
        this.head = 0;
      }
      this.chunks.push(Buffer.from(value.buffer, value.byteOffset, value.byteLength));
      this.buffered += value.length;
    }
  }

  /** Up to n bytes, in a fresh Buffer: fewer only at the end of the input. */
  async read(n) {
    await this.fill(n);
    const take = Math.min(n, this.buffered);
    const out = Buffer.allocUnsafe(take);
    let at = 0;
    while (at < take) {
      const chunk = this.chunks[this.head];
      const part = Math.min(chunk.length, take - at);
      chunk.copy(out, at, 0, part);
      at += part;
      if (part === chunk.length) this.chunks[this.head++] = undefined;
      else this.chunks[this.head] = chunk.subarray(part);
    }
    this.buffered -= take;
    if (this.head === this.chunks.length) {
      this.chunks = [];
      this.head = 0;
    }
    return out;
  }

  /** Whether nothing follows (reads ahead at most one chunk). */
  async atEnd() {
    await this.fill(1);
    return this.buffered === 0;
  }

  /** Lets go of the input: a stream read only in part is destroyed. */
  async close() {
    this.chunks = [];
    this.buffered = 0;
    if (!this.done && typeof this.it.return === 'function') {
      this.done = true;
      try {
        await this.it.return();
      } catch {
        // the input's own failure on close does not replace the error being reported
      }
    }
  }
}

async function readHeader(reader) {
  const fixed = await reader.read(MAGIC.length + 2);
  if (fixed.length < MAGIC.length + 2 || !fixed.subarray(0, MAGIC.length).equals(MAGIC)) {
    throw new E.SealedFileFormatError('not an encloud sealed file');
  }
  const version = fixed[MAGIC.length];
  const length = fixed[MAGIC.length + 1];
  if (version !== VERSION) {
    throw new E.SealedFileFormatError(`sealed-file version ${version} is not one this client reads`);
  }
  const raw = await reader.read(length);
  const keyId = raw.length === length && raw.every((c) => c < 0x80) ? raw.toString('latin1') : '';
  if (!KEY_ID_PATTERN.test(keyId)) throw new E.SealedFileFormatError("the sealed file's key id is malformed");
  return { keyId, version, bytes: Buffer.concat([fixed, raw]) };
}

function openSegment(kFile, nonce, segment, index) {
  const decipher = crypto.createDecipheriv('aes-256-gcm', kFile, nonce, { authTagLength: TAG_LENGTH });
  decipher.setAuthTag(segment.subarray(segment.length - TAG_LENGTH));
  const plaintext = decipher.update(segment.subarray(0, segment.length - TAG_LENGTH));
  try {
    decipher.final();
  } catch {
    throw new E.SealedFileDecryptError(`segment ${index} of the sealed file does not open`);
  }
  return plaintext;
}

/** The core: header, key id, Tink header, then each segment authenticated before `write`. */
async function openInto(reader, write, key, { expectedKeyId, stats } = {}) {
  const header = await readHeader(reader);
  if (expectedKeyId !== undefined && expectedKeyId !== null && header.keyId !== expectedKeyId) {
    throw new E.SealedFileKeyIdError(
      `the file is sealed under key id '${header.keyId}', not '${expectedKeyId}'`,
    );
  }
  const tink = await reader.read(TINK_HEADER_LENGTH);
  if (tink.length !== TINK_HEADER_LENGTH || tink[0] !== TINK_HEADER_LENGTH) {
    throw new E.SealedFileFormatError("the sealed file's segment header is malformed");
  }
  const salt = tink.subarray(1, 1 + KEY_LENGTH);
  const prefix = tink.subarray(1 + KEY_LENGTH);
  const kFile = fileKey(key, salt, header.bytes);
  let bytes = 0;
  for (let index = 0; ; index++) {
    const segment = await reader.read(index === 0 ? SEGMENT_SIZE - TINK_HEADER_LENGTH : SEGMENT_SIZE);
    const last = await reader.atEnd();
    if (segment.length < TAG_LENGTH) {
      throw new E.SealedFileDecryptError('the sealed file does not open (segment too short)');
    }
    const plaintext = openSegment(kFile, segmentNonce(prefix, index, last), segment, index);
    if (stats) {
      const held = segment.length + reader.buffered + plaintext.length;
      stats.maxHeldBytes = Math.max(stats.maxHeldBytes || 0, held);
      stats.segments = index + 1;
    }
    if (plaintext.length) await write(plaintext);
    bytes += plaintext.length;
    if (last) return { keyId: header.keyId, version: header.version, bytes };
  }
}

function checkOptions(options) {
  const opts = options || {};
  const { expectedKeyId } = opts;
  if (expectedKeyId !== undefined && expectedKeyId !== null && typeof expectedKeyId !== 'string') {
    throw new TypeError('expectedKeyId is a string');
  }
  return opts;
}

/** Resolves on 'drain'; rejects if the output fails or closes first. */
function drained(output) {
  return new Promise((resolve, reject) => {
    const done = (err) => {
      output.removeListener('drain', onDrain);
      output.removeListener('error', onError);
      output.removeListener('close', onClose);
      if (err) reject(err);
      else resolve();
    };
    const onDrain = () => done();
    const onError = (err) => done(err);
    const onClose = () => done(new Error('the output closed before the file was opened'));
    output.on('drain', onDrain);
    output.on('error', onError);
    output.on('close', onClose);
  });
}

/**
 * Opens a sealed file from `input` (a readable stream, or an async or sync iterable of
 * Buffers) into `output` (a writable stream), segment by segment; resolves to
 * { keyId, version, bytes } (bytes: the plaintext length).
 *
 * options: expectedKeyId (SealedFileKeyIdError when the file names another), end (default
 * true: end `output` and wait until it finished, so the bytes are flushed when this resolves;
 * false for e.g. process.stdout), stats (an object; gets maxHeldBytes, the most bytes of input,
 * ciphertext and plaintext this function held at once, and segments, for tests).
 *
 * A segment's plaintext is written only once it authenticated, but a file cut short or
 * tampered with in a later segment fails only there: on a failure the output has the earlier
 * segments' plaintext and is left open (not ended) for the caller to discard. Write to a
 * temporary file and keep it only when this resolves (`encloud-node open` does).
 */
async function openSealedFile(input, output, key, options = {}) {
  const opts = checkOptions(options);
  const k = checkKey(key);
  if (!output || typeof output.write !== 'function' || typeof output.on !== 'function') {
    throw new TypeError('the output is a writable stream');
  }
  const reader = new ByteReader(input);
  let failure = null;
  const onError = (err) => {
    if (!failure) failure = err;
  };
  output.on('error', onError);
  const check = () => {
    if (failure) throw failure;
    if (output.destroyed) throw new Error('the output was destroyed before the file was opened');
  };
  const write = async (chunk) => {
    check();
    if (!output.write(chunk)) await drained(output);
    check();
  };
  try {
    const result = await openInto(reader, write, k, opts);
    if (opts.end !== false) {
      check();
      output.end();
      await finished(output, { readable: false });
    }
    if (failure) throw failure;
    return result;
  } finally {
    output.removeListener('error', onError);
    await reader.close();
  }
}

/**
 * Opens a whole sealed file held in memory; resolves to { keyId, version, plaintext }.
 * options: expectedKeyId.
 */
async function openSealedBuffer(buffer, key, options = {}) {
  if (!(buffer instanceof Uint8Array)) throw new TypeError('a sealed file is a Buffer');
  const opts = checkOptions(options);
  const k = checkKey(key);
  const reader = new ByteReader(buffer);
  const parts = [];
  const { keyId, version } = await openInto(reader, async (p) => parts.push(p), k, opts);
  return { keyId, version, plaintext: Buffer.concat(parts) };
}

module.exports = {
  MAGIC,
  VERSION,
  KEY_LENGTH,
  SEGMENT_SIZE,
  TAG_LENGTH,
  NONCE_PREFIX_LENGTH,
  TINK_HEADER_LENGTH,
  checkKeyId,
  sealedHeader,
  fileKey,
  segmentNonce,
  readKeyFile,
  openSealedFile,
  openSealedBuffer,
};
