'use strict';
// Strict parsers for the TPM 2.0 structures a quote verifier reads (TPM 2.0 Part 2):
// TPMT_PUBLIC (RSA 2048/3072, ECC P-256/P-384), TPMS_ATTEST with TPMS_QUOTE_INFO,
// TPMT_SIGNATURE (ECDSA, RSASSA, RSAPSS over SHA-256/384) and TPML_PCR_SELECTION.
// Every length is checked, trailing bytes are refused; failures are MalformedEvidenceError.
const { MalformedEvidenceError } = require('./errors');
const { hash, u16, u32 } = require('./encoding');

const C = {
  TPM_GENERATED_VALUE: 0xff544347,
  TPM_ST_ATTEST_QUOTE: 0x8018,
  TPM_ALG_RSA: 0x0001,
  TPM_ALG_SHA1: 0x0004,
  TPM_ALG_AES: 0x0006,
  TPM_ALG_SHA256: 0x000b,
  TPM_ALG_SHA384: 0x000c,
  TPM_ALG_SHA512: 0x000d,
  TPM_ALG_NULL: 0x0010,
  TPM_ALG_RSASSA: 0x0014,
  TPM_ALG_RSAPSS: 0x0016,
  TPM_ALG_ECDSA: 0x0018,
  TPM_ALG_ECC: 0x0023,
  TPM_ALG_CFB: 0x0043,
  TPM_ECC_NIST_P256: 0x0003,
  TPM_ECC_NIST_P384: 0x0004,
  TPM_RH_OWNER: 0x40000001,
  TPM_RH_NULL: 0x40000007,
  TPM_RH_ENDORSEMENT: 0x4000000b,
  TPM_RH_PLATFORM: 0x4000000c,
  FIXED_TPM: 1 << 1,
  FIXED_PARENT: 1 << 4,
  RESTRICTED: 1 << 16,
  DECRYPT: 1 << 17,
  SIGN_ENCRYPT: 1 << 18,
};
const RESERVED_ATTRIBUTES = 0xfff0f309;
const HASH_SIZES = { 0x0004: 20, 0x000b: 32, 0x000c: 48, 0x000d: 64 };
const HASH_NAMES = { 0x0004: 'sha1', 0x000b: 'sha256', 0x000c: 'sha384', 0x000d: 'sha512' };
const SIGNING_HASHES = new Set([C.TPM_ALG_SHA256, C.TPM_ALG_SHA384]);
const ECC_CURVES = { 0x0003: { name: 'P-256', size: 32 }, 0x0004: { name: 'P-384', size: 48 } };
const MAX_NAME_SIZE = 2 + 64;
const MAX_DIGEST_SIZE = 64;
const MAX_PCR_BANKS = 16;
const MAX_SIZEOF_SELECT = 4;
const MAX_ECC_PARAMETER = 66;
const MAX_RSA_SIGNATURE = 512;

class Reader {
  constructor(data, structure) {
    if (!(data instanceof Uint8Array)) {
      throw new MalformedEvidenceError(`${structure}: expected bytes`);
    }
    this.data = Buffer.from(data);
    this.pos = 0;
    this.structure = structure;
  }
  fail(field, why) {
    return new MalformedEvidenceError(`${this.structure}.${field}: ${why}`);
  }
  take(n, field) {
    const left = this.data.length - this.pos;
    if (n > left) throw this.fail(field, `needs ${n} bytes, ${left} remain`);
    const out = this.data.subarray(this.pos, this.pos + n);
    this.pos += n;
    return Buffer.from(out);
  }
  u8(field) {
    return this.take(1, field)[0];
  }
  u16(field) {
    return this.take(2, field).readUInt16BE();
  }
  u32(field) {
    return this.take(4, field).readUInt32BE();
  }
  u64(field) {
    return this.take(8, field).readBigUInt64BE();
  }
  tpm2b(field, max) {
    const size = this.u16(`${field}.size`);
    if (size > max) throw this.fail(`${field}.size`, `${size} exceeds the maximum ${max}`);
    return this.take(size, field);
  }
  end() {
    const left = this.data.length - this.pos;
    if (left) throw new MalformedEvidenceError(`${this.structure}: ${left} trailing bytes`);
  }
}

function hashAlg(r, field, allowed = SIGNING_HASHES) {
  const alg = r.u16(field);
  if (!allowed.has(alg)) {
    if (alg === C.TPM_ALG_SHA1) throw r.fail(field, 'SHA-1 is refused');
    throw r.fail(field, `hash algorithm 0x${alg.toString(16)} is not accepted`);
  }
  return alg;
}

function parseSymmetric(r) {
  const alg = r.u16('parameters.symmetric.algorithm');
  if (alg === C.TPM_ALG_NULL) return { algorithm: alg };
  if (alg !== C.TPM_ALG_AES) throw r.fail('parameters.symmetric.algorithm', 'not accepted');
  const bits = r.u16('parameters.symmetric.keyBits');
  if (bits !== 128 && bits !== 256) throw r.fail('parameters.symmetric.keyBits', 'not 128/256');
  const mode = r.u16('parameters.symmetric.mode');
  if (mode !== C.TPM_ALG_CFB) throw r.fail('parameters.symmetric.mode', 'not CFB');
  return { algorithm: alg, keyBits: bits, mode };
}

function parseScheme(r, allowed) {
  const scheme = r.u16('parameters.scheme.scheme');
  if (scheme === C.TPM_ALG_NULL) return [scheme, C.TPM_ALG_NULL];
  if (!allowed.includes(scheme)) throw r.fail('parameters.scheme.scheme', 'not accepted');
  return [scheme, hashAlg(r, 'parameters.scheme.hashAlg')];
}

/** Parse a marshalled TPMT_PUBLIC (no TPM2B size prefix) of an RSA or ECC key. */
function parsePublic(data) {
  const r = new Reader(data, 'TPMT_PUBLIC');
  const type = r.u16('type');
  if (type !== C.TPM_ALG_RSA && type !== C.TPM_ALG_ECC) throw r.fail('type', 'not RSA or ECC');
  const nameAlg = hashAlg(r, 'nameAlg');
  const attributes = r.u32('objectAttributes');
  if ((attributes & RESERVED_ATTRIBUTES) >>> 0) throw r.fail('objectAttributes', 'reserved bits');
  const authPolicy = r.tpm2b('authPolicy', MAX_DIGEST_SIZE);
  if (authPolicy.length && authPolicy.length !== HASH_SIZES[nameAlg]) {
    throw r.fail('authPolicy', 'size is neither 0 nor the nameAlg digest size');
  }
  const symmetric = parseSymmetric(r);
  const base = { raw: Buffer.from(data), type, nameAlg, attributes, authPolicy, symmetric };
  if (type === C.TPM_ALG_ECC) {
    const [scheme, schemeHash] = parseScheme(r, [C.TPM_ALG_ECDSA]);
    const curve = r.u16('parameters.curveID');
    if (!ECC_CURVES[curve]) throw r.fail('parameters.curveID', 'not P-256 or P-384');
    const kdf = r.u16('parameters.kdf.scheme');
    if (kdf !== C.TPM_ALG_NULL) throw r.fail('parameters.kdf.scheme', 'not NULL');
    const size = ECC_CURVES[curve].size;
    const x = r.tpm2b('unique.x', size);
    const y = r.tpm2b('unique.y', size);
    if (x.length !== size || y.length !== size) throw r.fail('unique', `not ${size} bytes`);
    r.end();
    return { ...base, scheme, schemeHash, curve, x, y };
  }
  const [scheme, schemeHash] = parseScheme(r, [C.TPM_ALG_RSASSA, C.TPM_ALG_RSAPSS]);
  const keyBits = r.u16('parameters.keyBits');
  if (keyBits !== 2048 && keyBits !== 3072) throw r.fail('parameters.keyBits', 'not 2048/3072');
  const exponent = r.u32('parameters.exponent') || 65537;
  if (exponent < 3 || exponent % 2 === 0) throw r.fail('parameters.exponent', 'not odd >= 3');
  const modulus = r.tpm2b('unique.rsa', keyBits / 8);
  if (modulus.length !== keyBits / 8 || !(modulus[0] & 0x80)) {
    throw r.fail('unique.rsa', `modulus is not exactly ${keyBits} bits`);
  }
  r.end();
  return { ...base, scheme, schemeHash, keyBits, exponent, modulus };
}

/** The TPM Name: nameAlg || H_nameAlg(TPMT_PUBLIC). */
function name(ak) {
  return Buffer.concat([u16(ak.nameAlg), hash(HASH_NAMES[ak.nameAlg], ak.raw)]);
}

/** Qualified names of the key as a primary of the owner, endorsement, platform, null hierarchy. */
function qualifiedNames(ak) {
  const n = name(ak);
  return [C.TPM_RH_OWNER, C.TPM_RH_ENDORSEMENT, C.TPM_RH_PLATFORM, C.TPM_RH_NULL].map((h) =>
    Buffer.concat([u16(ak.nameAlg), hash(HASH_NAMES[ak.nameAlg], Buffer.concat([u32(h), n]))]),
  );
}

function parsePcrSelectionFrom(r) {
  const count = r.u32('pcrSelect.count');
  if (count > MAX_PCR_BANKS) throw r.fail('pcrSelect.count', 'too many banks');
  const banks = [];
  const seen = new Set();
  for (let i = 0; i < count; i++) {
    const field = `pcrSelect[${i}]`;
    const alg = r.u16(`${field}.hash`);
    if (!HASH_SIZES[alg]) throw r.fail(`${field}.hash`, 'hash algorithm not known');
    if (seen.has(alg)) throw r.fail(`${field}.hash`, 'bank appears twice');
    seen.add(alg);
    const size = r.u8(`${field}.sizeofSelect`);
    if (size < 1 || size > MAX_SIZEOF_SELECT) throw r.fail(`${field}.sizeofSelect`, 'bad size');
    const bitmap = r.take(size, `${field}.pcrSelect`);
    const indices = [];
    bitmap.forEach((byte, j) => {
      for (let bit = 0; bit < 8; bit++) if ((byte >> bit) & 1) indices.push(j * 8 + bit);
    });
    banks.push({ hashAlg: alg, indices });
  }
  return banks;
}

/** Parse signed TPMS_ATTEST bytes; the quote body strictly when the type is a quote. */
function parseAttest(data) {
  const r = new Reader(data, 'TPMS_ATTEST');
  const magic = r.u32('magic');
  const type = r.u16('type');
  const qualifiedSigner = r.tpm2b('qualifiedSigner', MAX_NAME_SIZE);
  const extraData = r.tpm2b('extraData', MAX_DIGEST_SIZE);
  const clock = r.u64('clockInfo.clock');
  const resetCount = r.u32('clockInfo.resetCount');
  const restartCount = r.u32('clockInfo.restartCount');
  const safe = r.u8('clockInfo.safe');
  if (safe > 1) throw r.fail('clockInfo.safe', 'not YES or NO');
  const firmwareVersion = r.u64('firmwareVersion');
  let quote = null;
  if (type === C.TPM_ST_ATTEST_QUOTE) {
    const pcrSelect = parsePcrSelectionFrom(r);
    const pcrDigest = r.tpm2b('attested.quote.pcrDigest', MAX_DIGEST_SIZE);
    r.end();
    quote = { pcrSelect, pcrDigest };
  }
  return {
    magic,
    type,
    qualifiedSigner,
    extraData,
    clock,
    resetCount,
    restartCount,
    safe: safe === 1,
    firmwareVersion,
    quote,
  };
}

/** Parse a marshalled TPMT_SIGNATURE. */
function parseSignature(data) {
  const r = new Reader(data, 'TPMT_SIGNATURE');
  const sigAlg = r.u16('sigAlg');
  if (![C.TPM_ALG_ECDSA, C.TPM_ALG_RSASSA, C.TPM_ALG_RSAPSS].includes(sigAlg)) {
    throw r.fail('sigAlg', 'signature algorithm not accepted');
  }
  const hashAlgId = hashAlg(r, 'signature.hash');
  if (sigAlg === C.TPM_ALG_ECDSA) {
    const sr = r.tpm2b('signature.signatureR', MAX_ECC_PARAMETER);
    const ss = r.tpm2b('signature.signatureS', MAX_ECC_PARAMETER);
    if (!sr.length || !ss.length) throw r.fail('signature', 'empty r or s');
    r.end();
    return { sigAlg, hashAlg: hashAlgId, r: sr, s: ss };
  }
  const sig = r.tpm2b('signature.sig', MAX_RSA_SIGNATURE);
  if (!sig.length) throw r.fail('signature.sig', 'empty signature');
  r.end();
  return { sigAlg, hashAlg: hashAlgId, rsaSignature: sig };
}

module.exports = {
  C,
  HASH_SIZES,
  HASH_NAMES,
  ECC_CURVES,
  parsePublic,
  parseAttest,
  parseSignature,
  name,
  qualifiedNames,
};
