'use strict';
// Qualifying data, HPKE key release, handshake hash and traffic keys (docs/PROTOCOL.md 1, 3).
const crypto = require('node:crypto');
const { CipherSuite, HkdfSha256, Aes256Gcm } = require('@hpke/core');
const { DhkemX25519HkdfSha256 } = require('@hpke/dhkem-x25519');
const { encode, sha256, u16, u32 } = require('./encoding');
const { KeyOpenError } = require('./errors');

const subtle = crypto.webcrypto.subtle;
const SUITE_V1 = { kemId: 0x0020, kdfId: 0x0001, aeadId: 0x0002 };
const ENC_LENGTH = 32;
const DEK_LENGTH = 32;
const SESSION_SECRET_LENGTH = 32;

function suiteBytes(suite = SUITE_V1) {
  return Buffer.concat([u16(suite.kemId), u16(suite.kdfId), u16(suite.aeadId)]);
}

function isV1(suite) {
  return suite.kemId === 0x20 && suite.kdfId === 1 && suite.aeadId === 2;
}

function hpkeSuite() {
  return new CipherSuite({
    kem: new DhkemX25519HkdfSha256(),
    kdf: new HkdfSha256(),
    aead: new Aes256Gcm(),
  });
}

/** Q = H(E("encloud/v1 quote", suite, nonce, session_pub, session_id, u32(ttl))). */
function quoteQualifyingData(suite, nonce, sessionPub, sessionId, ttlSeconds) {
  return sha256(
    encode('encloud/v1 quote', suiteBytes(suite), nonce, sessionPub, sessionId, u32(ttlSeconds)),
  );
}

/** info = E("encloud/v1 release", suite, session_id, H_ev). */
function releaseInfo(suite, sessionId, attestDigest) {
  return encode('encloud/v1 release', suiteBytes(suite), sessionId, attestDigest);
}

function handshakeHash(suite, nonce, sessionPub, sessionId, ttlSeconds, attestDigest, enc) {
  return sha256(
    encode(
      'encloud/v1 handshake',
      suiteBytes(suite),
      nonce,
      sessionPub,
      sessionId,
      u32(ttlSeconds),
      attestDigest,
      enc,
    ),
  );
}

/** HKDF-SHA256 with salt H_hs and IKM DEK || S: k_c2s, k_s2c, k_kc (32 bytes each). */
async function deriveTrafficKeys(dek, sessionSecret, hHs) {
  const ikm = await subtle.importKey('raw', Buffer.concat([dek, sessionSecret]), 'HKDF', false, [
    'deriveBits',
  ]);
  const out = {};
  for (const [name, label] of [
    ['c2s', 'encloud/v1 c2s'],
    ['s2c', 'encloud/v1 s2c'],
    ['kc', 'encloud/v1 kc'],
  ]) {
    const bits = await subtle.deriveBits(
      { name: 'HKDF', hash: 'SHA-256', salt: hHs, info: Buffer.from(label, 'ascii') },
      ikm,
      256,
    );
    out[name] = Buffer.from(bits);
  }
  return out;
}

/** HPKE base-mode seal of DEK || S to the session key: returns enc || ciphertext. */
async function sealKey(sessionPub, dek, sessionSecret, info) {
  if (dek.length !== DEK_LENGTH || sessionSecret.length !== SESSION_SECRET_LENGTH) {
    throw new RangeError('the DEK and the session secret are 32 bytes each');
  }
  const suite = hpkeSuite();
  const recipientPublicKey = await suite.kem.deserializePublicKey(sessionPub);
  const { ct, enc } = await suite.seal(
    { recipientPublicKey, info },
    Buffer.concat([dek, sessionSecret]),
  );
  return Buffer.concat([Buffer.from(enc), Buffer.from(ct)]);
}

/** Open a sealed DEK || S with the recipient's raw X25519 private key (server side, vectors). */
async function openKey(privateKey, sealedKey, info) {
  if (sealedKey.length <= ENC_LENGTH) throw new KeyOpenError('sealed key is too short');
  const suite = hpkeSuite();
  let plaintext;
  try {
    const recipientKey = await suite.kem.deserializePrivateKey(privateKey);
    plaintext = Buffer.from(
      await suite.open(
        { recipientKey, enc: sealedKey.subarray(0, ENC_LENGTH), info },
        sealedKey.subarray(ENC_LENGTH),
      ),
    );
  } catch {
    throw new KeyOpenError('sealed key did not open');
  }
  if (plaintext.length !== DEK_LENGTH + SESSION_SECRET_LENGTH) {
    throw new KeyOpenError('sealed key has the wrong length');
  }
  return { dek: plaintext.subarray(0, 32), sessionSecret: plaintext.subarray(32) };
}

module.exports = {
  SUITE_V1,
  ENC_LENGTH,
  suiteBytes,
  isV1,
  quoteQualifyingData,
  releaseInfo,
  handshakeHash,
  deriveTrafficKeys,
  sealKey,
  openKey,
};
