'use strict';
// The canonical encoding E(label, f1, ..., fk) of protocol v2 (docs/PROTOCOL.md).
const crypto = require('node:crypto');

const MAX_FIELD_LENGTH = 0xffff;

function encode(label, ...fields) {
  const parts = [Buffer.from(label, 'ascii'), Buffer.from([0])];
  for (const field of fields) {
    if (field.length > MAX_FIELD_LENGTH) {
      throw new RangeError(`field of ${field.length} bytes exceeds ${MAX_FIELD_LENGTH}`);
    }
    const len = Buffer.alloc(2);
    len.writeUInt16BE(field.length);
    parts.push(len, Buffer.from(field));
  }
  return Buffer.concat(parts);
}

function sha256(data) {
  return crypto.createHash('sha256').update(data).digest();
}

function hash(alg, data) {
  return crypto.createHash(alg).update(data).digest();
}

function u8(v) {
  return Buffer.from([v]);
}
function u16(v) {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
}
function u32(v) {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
}
function u64(v) {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}

/** Constant-time equality of two byte strings (false when the lengths differ). */
function equal(a, b) {
  a = Buffer.from(a);
  b = Buffer.from(b);
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

module.exports = { encode, sha256, hash, u8, u16, u32, u64, equal, MAX_FIELD_LENGTH };
