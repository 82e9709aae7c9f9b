'use strict';
// The sealed envelope: AES-256-GCM with typed associated data and padding
// (docs/PROTOCOL.md 4), and the transcript hash (5).
const crypto = require('node:crypto');
const { encode, sha256, u8, u32, u64 } = require('./encoding');
const { DecryptError, HeaderMismatchError, KeyExhaustedError } = require('./errors');

const subtle = crypto.webcrypto.subtle;
const NONCE_LENGTH = 12;
const TAG_LENGTH = 16;
const MAX_MESSAGES_PER_KEY = 2 ** 28;
const MessageType = {
  REQUEST: 1,
  RESPONSE: 2,
  FRAME: 3,
  FINAL: 4,
  END: 5,
  KEY_CONFIRM: 6,
  EMBED_REQUEST: 7,
  EMBED_RESPONSE: 8,
};
const PAD_BUCKETS = { 1: 1024, 2: 1024, 3: 64, 4: 128, 5: 1024, 6: 128, 7: 1024, 8: 1024 };

function associatedData(type, sessionId, requestId, seq) {
  return encode('encloud/v2 aead', u8(type), sessionId, u64(requestId), u32(seq));
}

function paddedLength(payloadLength, bucket) {
  return Math.max(bucket, Math.ceil((4 + payloadLength) / bucket) * bucket);
}

function pad(payload, bucket) {
  const out = Buffer.alloc(paddedLength(payload.length, bucket));
  out.writeUInt32BE(payload.length);
  Buffer.from(payload).copy(out, 4);
  return out;
}

function unpad(padded, bucket) {
  if (padded.length < 4) throw new DecryptError('sealed message rejected');
  const length = padded.readUInt32BE(0);
  if (4 + length > padded.length || padded.length !== paddedLength(length, bucket)) {
    throw new DecryptError('sealed message rejected');
  }
  if (padded.subarray(4 + length).some((byte) => byte !== 0)) {
    throw new DecryptError('sealed message rejected');
  }
  return Buffer.from(padded.subarray(4, 4 + length));
}

async function aesKey(raw, usage) {
  return subtle.importKey('raw', raw, { name: 'AES-GCM' }, false, [usage]);
}

/** Seals one direction's messages and counts them against the key's budget. */
class SealingKey {
  constructor(key, sessionId, { nonceSource } = {}) {
    this.keyPromise = aesKey(key, 'encrypt');
    this.sessionId = sessionId;
    this.sealedCount = 0;
    this.nonceSource = nonceSource || (() => crypto.randomBytes(NONCE_LENGTH));
  }

  async seal(type, requestId, seq, payload, { reserved = false } = {}) {
    const limit = reserved ? MAX_MESSAGES_PER_KEY : MAX_MESSAGES_PER_KEY - 1;
    if (this.sealedCount >= limit) throw new KeyExhaustedError('session key reached its budget');
    this.sealedCount += 1;
    const nonce = Buffer.from(this.nonceSource());
    const ciphertext = await subtle.encrypt(
      {
        name: 'AES-GCM',
        iv: nonce,
        additionalData: associatedData(type, this.sessionId, requestId, seq),
      },
      await this.keyPromise,
      pad(payload, PAD_BUCKETS[type]),
    );
    return { type, requestId, seq, sealed: Buffer.concat([nonce, Buffer.from(ciphertext)]) };
  }
}

/** Opens one direction's messages, checking the clear header first. */
class OpeningKey {
  constructor(key, sessionId) {
    this.keyPromise = aesKey(key, 'decrypt');
    this.sessionId = sessionId;
  }

  /** message: {type, requestId, seq, sealed}; returns the unpadded payload, or throws. */
  async open(message, expectedType, requestId, seq) {
    if (
      message.type !== expectedType ||
      BigInt(message.requestId) !== BigInt(requestId) ||
      message.seq !== seq
    ) {
      throw new HeaderMismatchError('sealed message header is not the expected one');
    }
    const data = Buffer.from(message.sealed);
    if (!PAD_BUCKETS[message.type] || data.length < NONCE_LENGTH + TAG_LENGTH) {
      throw new DecryptError('sealed message rejected');
    }
    let padded;
    try {
      padded = Buffer.from(
        await subtle.decrypt(
          {
            name: 'AES-GCM',
            iv: data.subarray(0, NONCE_LENGTH),
            additionalData: associatedData(message.type, this.sessionId, requestId, seq),
          },
          await this.keyPromise,
          data.subarray(NONCE_LENGTH),
        ),
      );
    } catch {
      throw new DecryptError('sealed message rejected');
    }
    return unpad(padded, PAD_BUCKETS[message.type]);
  }
}

/** T_0 = H(E("encloud/v2 transcript", session_id, u64(request_id), H(sealed request))). */
function transcriptStart(sessionId, requestId, sealedRequest) {
  return sha256(encode('encloud/v2 transcript', sessionId, u64(requestId), sha256(sealedRequest)));
}

/** T_(s+1) = H(T_s || u32(s) || u32(len) || payload_s). */
function transcriptNext(transcript, seq, payload) {
  return sha256(Buffer.concat([transcript, u32(seq), u32(payload.length), payload]));
}

module.exports = {
  NONCE_LENGTH,
  TAG_LENGTH,
  MAX_MESSAGES_PER_KEY,
  MessageType,
  PAD_BUCKETS,
  associatedData,
  paddedLength,
  pad,
  unpad,
  SealingKey,
  OpeningKey,
  transcriptStart,
  transcriptNext,
};
