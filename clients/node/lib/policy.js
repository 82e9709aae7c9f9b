'use strict';
// The verification policy (client/policy.py): the same JSON file the Python client reads.
const crypto = require('node:crypto');
const { PolicyError } = require('./errors');

const KEYS = [
  'version',
  'dev_only',
  'pcr_bank',
  'pcr_selection',
  'pcr_values',
  'workload_pcr',
  'allowed_model_digests',
  'allowed_runtime_events',
  'ak',
  'max_session_ttl_seconds',
];
const AK_KEYS = ['pinned_public_keys', 'certificate_roots', 'hardware_report'];
const PCR_BANKS = { sha256: { size: 32, alg: 0x000b } };

const fail = (field, why) => new PolicyError(`policy field '${field}': ${why}`);
const isInt = (v) => Number.isSafeInteger(v);

function hex(value, field, size) {
  if (typeof value !== 'string' || !new RegExp(`^[0-9a-f]{${2 * size}}$`).test(value)) {
    throw fail(field, `must be ${2 * size} lowercase hex digits`);
  }
  return Buffer.from(value, 'hex');
}

function hexList(obj, field, size) {
  const value = obj[field];
  if (!Array.isArray(value) || !value.length) throw fail(field, 'must be a non-empty list');
  const items = value.map((v, i) => hex(v, `${field}[${i}]`, size));
  if (new Set(items.map((b) => b.toString('hex'))).size !== items.length) {
    throw fail(field, 'has duplicates');
  }
  return items;
}

function spki(value, field) {
  if (typeof value !== 'string' || !/^[A-Za-z0-9+/]*={0,2}$/.test(value) || value.length % 4) {
    throw fail(field, 'must be a base64 string');
  }
  const der = Buffer.from(value, 'base64');
  let canonical;
  try {
    canonical = crypto
      .createPublicKey({ key: der, format: 'der', type: 'spki' })
      .export({ type: 'spki', format: 'der' });
  } catch {
    throw fail(field, 'is not base64 of a DER SubjectPublicKeyInfo');
  }
  if (!canonical.equals(der)) throw fail(field, 'is not canonical DER SubjectPublicKeyInfo');
  return der;
}

function root(value, field) {
  if (typeof value !== 'string') throw fail(field, 'must be a PEM string');
  const blocks = value.match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g);
  if (!blocks || blocks.length !== 1) throw fail(field, 'must hold exactly one certificate');
  try {
    return new crypto.X509Certificate(blocks[0]);
  } catch {
    throw fail(field, 'is not a PEM certificate');
  }
}

/** Parse and validate a policy (JSON text or Buffer); a problem raises PolicyError. */
function parsePolicy(text) {
  let obj;
  try {
    obj = JSON.parse(Buffer.isBuffer(text) ? text.toString('utf8') : text);
  } catch (err) {
    throw new PolicyError(`policy is not valid JSON: ${err.message}`);
  }
  if (!obj || typeof obj !== 'object' || Array.isArray(obj)) {
    throw new PolicyError('policy must be a JSON object');
  }
  const unknown = Object.keys(obj).filter((k) => !KEYS.includes(k)).sort();
  if (unknown.length) throw fail(unknown[0], 'unknown key');
  const missing = KEYS.filter((k) => !(k in obj)).sort();
  if (missing.length) throw fail(missing[0], 'missing');
  if (obj.version !== 1) throw fail('version', 'must be 1');
  if (typeof obj.dev_only !== 'boolean') throw fail('dev_only', 'must be true or false');
  if (obj.pcr_bank === 'sha1') throw fail('pcr_bank', 'sha1 is refused');
  const bank = PCR_BANKS[obj.pcr_bank];
  if (!bank || !Object.hasOwn(PCR_BANKS, obj.pcr_bank)) throw fail('pcr_bank', 'unknown bank');
  const selection = obj.pcr_selection;
  if (
    !Array.isArray(selection) ||
    !selection.length ||
    !selection.every((i) => isInt(i) && i >= 0 && i <= 23)
  ) {
    throw fail('pcr_selection', 'must be a non-empty list of integers 0..23');
  }
  if (selection.some((v, k) => k > 0 && v <= selection[k - 1])) {
    throw fail('pcr_selection', 'must be sorted ascending without duplicates');
  }
  const workloadPcr = obj.workload_pcr;
  if (!isInt(workloadPcr) || workloadPcr < 0 || workloadPcr > 23) {
    throw fail('workload_pcr', 'must be an integer in 0..23');
  }
  if (!selection.includes(workloadPcr)) throw fail('workload_pcr', 'is not in pcr_selection');
  const raw = obj.pcr_values;
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) {
    throw fail('pcr_values', 'must be an object of index -> hex');
  }
  const pcrValues = new Map();
  for (const [key, value] of Object.entries(raw)) {
    const field = `pcr_values.${key}`;
    if (!/^(0|[1-9][0-9]*)$/.test(key)) throw fail(field, 'key must be a PCR index in decimal');
    const index = Number(key);
    if (!selection.includes(index)) throw fail(field, 'PCR is not in pcr_selection');
    if (index === workloadPcr) throw fail(field, 'the workload PCR must not be pinned');
    pcrValues.set(index, hex(value, field, bank.size));
  }
  const allowedModelDigests = hexList(obj, 'allowed_model_digests', 32);
  const allowedRuntimeEvents = hexList(obj, 'allowed_runtime_events', 32);
  const ak = obj.ak;
  if (!ak || typeof ak !== 'object' || Array.isArray(ak)) throw fail('ak', 'must be an object');
  const unknownAk = Object.keys(ak).filter((k) => !AK_KEYS.includes(k)).sort();
  if (unknownAk.length) throw fail(`ak.${unknownAk[0]}`, 'unknown key');
  if ('hardware_report' in ak) throw fail('ak.hardware_report', 'not implemented yet');
  const keys = ak.pinned_public_keys ?? [];
  if (!Array.isArray(keys)) throw fail('ak.pinned_public_keys', 'must be a list');
  const pinned = keys.map((k, i) => spki(k, `ak.pinned_public_keys[${i}]`));
  if (new Set(pinned.map((b) => b.toString('hex'))).size !== pinned.length) {
    throw fail('ak.pinned_public_keys', 'has duplicates');
  }
  const rootsValue = ak.certificate_roots ?? [];
  if (!Array.isArray(rootsValue)) throw fail('ak.certificate_roots', 'must be a list');
  const roots = rootsValue.map((r, i) => root(r, `ak.certificate_roots[${i}]`));
  if (!pinned.length && !roots.length) {
    throw fail('ak.pinned_public_keys', 'at least one pinned key or certificate root is required');
  }
  const ttl = obj.max_session_ttl_seconds;
  if (!isInt(ttl) || ttl < 1 || ttl > 0xffffffff) {
    throw fail('max_session_ttl_seconds', 'must be an integer in 1..4294967295');
  }
  return {
    pcrBank: obj.pcr_bank,
    pcrBankAlg: bank.alg,
    pcrBankSize: bank.size,
    pcrSelection: [...selection],
    pcrValues,
    workloadPcr,
    allowedModelDigests,
    allowedRuntimeEvents,
    pinnedPublicKeys: pinned,
    certificateRoots: roots,
    maxSessionTtlSeconds: ttl,
    devOnly: obj.dev_only,
  };
}

module.exports = { parsePolicy };
