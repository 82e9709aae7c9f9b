'use strict';
// Qualifying data, HPKE key release, handshake hash and traffic keys (docs/PROTOCOL.md 1, 3).
const crypto = require('node:crypto');
const { CipherSuite, HkdfSha256, Aes256Gcm } = require('@hpke/core');
const { DhkemX25519HkdfSha256 } = require('@hpke/dhkem-x25519');
const { XWing } = require('@hpke/hybridkem-x-wing');
const { encode, sha256, u16, u32 } = require('./encoding');
const { KeyOpenError } = require('./errors');

const subtle = crypto.webcrypto.subtle;
const SUITE_V1 = { kemId: 0x0020, kdfId: 0x0001, aeadId: 0x0002 };
const SUITE_XWING = { kemId: 0x647a, kdfId: 0x0001, aeadId: 0x0002 };
/** Policy names (`hpke_suites`) of the suites, and the default order: the hybrid first. */
const SUITE_NAMES = { 'mlkem768-x25519': SUITE_XWING, x25519: SUITE_V1 };
const DEFAULT_SUITES = ['mlkem768-x25519', 'x25519'];
const ENC_LENGTH = 32; // X25519's; encLength(suite) for any suite
const ENC_LENGTHS = { [0x0020]: 32, [0x647a]: 1120 };
const PUBLIC_LENGTHS = { [0x0020]: 32, [0x647a]: 1216 };
const SESSION_ID_LENGTH = 16;
const DEK_LENGTH = 32;
const SESSION_SECRET_LENGTH = 32;

function suiteBytes(suite = SUITE_V1) {
  return Buffer.concat([u16(suite.kemId), u16(suite.kdfId), u16(suite.aeadId)]);
}

function isV1(suite) {
  return suite.kemId === 0x20 && suite.kdfId === 1 && suite.aeadId === 2;
}

function isXWing(suite) {
  return suite.kemId === 0x647a && suite.kdfId === 1 && suite.aeadId === 2;
}

function encLength(suite) {
  return ENC_LENGTHS[suite.kemId];
}

/** Bytes of a session public key of the suite (X25519 32, X-Wing 1216). */
function publicKeyLength(suite) {
  return PUBLIC_LENGTHS[suite.kemId];
}

// @hpke takes Uint8Arrays of their own: a Buffer may be a view into Node's shared pool.
const own = (bytes) => new Uint8Array(bytes);

function hpkeSuite(suite = SUITE_V1) {
  return new CipherSuite({
    kem: isXWing(suite) ? new XWing() : new DhkemX25519HkdfSha256(),
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

/** HPKE base-mode seal of DEK || S || client_secret to the session key: enc || ciphertext.
 * `suite` is SUITE_V1 (X25519) unless given (SUITE_XWING: a 1,216-byte session_pub). */
async function sealKey(sessionPub, dek, sessionSecret, clientSecret, info, suite = SUITE_V1) {
  if (
    dek.length !== DEK_LENGTH ||
    sessionSecret.length !== SESSION_SECRET_LENGTH ||
    clientSecret.length !== CLIENT_SECRET_LENGTH
  ) {
    throw new RangeError('the DEK, the session secret and the client secret are 32 bytes each');
  }
  const hpke = hpkeSuite(suite);
  const recipientPublicKey = await hpke.kem.deserializePublicKey(own(sessionPub));
  const plaintext = Buffer.concat([dek, sessionSecret, clientSecret]);
  try {
    const { ct, enc } = await hpke.seal({ recipientPublicKey, info: own(info) }, own(plaintext));
    return Buffer.concat([Buffer.from(enc), Buffer.from(ct)]);
  } finally {
    plaintext.fill(0);
  }
}

/** Open a sealed DEK || S || client_secret with the recipient's raw X25519 private key
 * (server side, vectors). */
async function openKey(privateKey, sealedKey, info, suite = SUITE_V1) {
  const encLen = encLength(suite);
  if (sealedKey.length <= encLen) throw new KeyOpenError('sealed key is too short');
  const hpke = hpkeSuite(suite);
  let plaintext;
  try {
    // X25519: the raw private key; X-Wing: its 32-byte seed.
    const recipientKey = isXWing(suite)
      ? await hpke.kem.importKey('raw', own(privateKey), false)
      : await hpke.kem.deserializePrivateKey(own(privateKey));
    plaintext = Buffer.from(
      await hpke.open(
        { recipientKey, enc: own(sealedKey.subarray(0, encLen)), info: own(info) },
        own(sealedKey.subarray(encLen)),
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
  SUITE_XWING,
  SUITE_NAMES,
  DEFAULT_SUITES,
  ENC_LENGTH,
  encLength,
  publicKeyLength,
  SESSION_ID_LENGTH,
  isXWing,
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
