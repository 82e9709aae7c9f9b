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

const CLIENT_SECRET_LENGTH = 32;

/** C = H(E("encloud/v2 client commitment", client_secret)): sent with Attest, opened inside
 * the sealed key, so only the client that attested can bind its session. */
function clientCommitment(clientSecret) {
  if (clientSecret.length !== CLIENT_SECRET_LENGTH) throw new RangeError('the client secret is 32 bytes');
  return sha256(encode('encloud/v2 client commitment', clientSecret));
}

/** Constant time: does clientSecret open commitment? (server side, vectors) */
function opensCommitment(commitment, clientSecret) {
  if (clientSecret.length !== CLIENT_SECRET_LENGTH) return false;
  const ours = clientCommitment(clientSecret);
  return ours.length === commitment.length && crypto.timingSafeEqual(ours, commitment);
}

/** Q = H(E("encloud/v2 quote", suite, nonce, C, session_pub, session_id, u32(ttl))). */
function quoteQualifyingData(suite, nonce, commitment, sessionPub, sessionId, ttlSeconds) {
  return sha256(
    encode(
      'encloud/v2 quote',
      suiteBytes(suite),
      nonce,
      commitment,
      sessionPub,
      sessionId,
      u32(ttlSeconds),
    ),
  );
}

/** info = E("encloud/v2 release", suite, session_id, H_ev). */
function releaseInfo(suite, sessionId, attestDigest) {
  return encode('encloud/v2 release', suiteBytes(suite), sessionId, attestDigest);
}

function handshakeHash(suite, nonce, sessionPub, sessionId, ttlSeconds, attestDigest, enc) {
  return sha256(
    encode(
      'encloud/v2 handshake',
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
    ['c2s', 'encloud/v2 c2s'],
    ['s2c', 'encloud/v2 s2c'],
    ['kc', 'encloud/v2 kc'],
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

/** HPKE base-mode seal of DEK || S || client_secret to the session key: enc || ciphertext. */
async function sealKey(sessionPub, dek, sessionSecret, clientSecret, info) {
  if (
    dek.length !== DEK_LENGTH ||
    sessionSecret.length !== SESSION_SECRET_LENGTH ||
    clientSecret.length !== CLIENT_SECRET_LENGTH
  ) {
    throw new RangeError('the DEK, the session secret and the client secret are 32 bytes each');
  }
  const suite = hpkeSuite();
  const recipientPublicKey = await suite.kem.deserializePublicKey(sessionPub);
  const plaintext = Buffer.concat([dek, sessionSecret, clientSecret]);
  try {
    const { ct, enc } = await suite.seal({ recipientPublicKey, info }, plaintext);
    return Buffer.concat([Buffer.from(enc), Buffer.from(ct)]);
  } finally {
    plaintext.fill(0);
  }
}

/** Open a sealed DEK || S || client_secret with the recipient's raw X25519 private key
 * (server side, vectors). */
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
  if (plaintext.length !== DEK_LENGTH + SESSION_SECRET_LENGTH + CLIENT_SECRET_LENGTH) {
    throw new KeyOpenError('sealed key has the wrong length');
  }
  return {
    dek: plaintext.subarray(0, 32),
    sessionSecret: plaintext.subarray(32, 64),
    clientSecret: plaintext.subarray(64),
  };
}

module.exports = {
  SUITE_V1,
  ENC_LENGTH,
  suiteBytes,
  isV1,
  CLIENT_SECRET_LENGTH,
  clientCommitment,
  opensCommitment,
  quoteQualifyingData,
  releaseInfo,
  handshakeHash,
  deriveTrafficKeys,
  sealKey,
  openKey,
};
