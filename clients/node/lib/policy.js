'use strict';
// The verification policy (protocol/policy.py): the same JSON file the Python client reads.
const crypto = require('node:crypto');
const { PolicyError, PolicyIncompleteError, UnsupportedPolicyError } = require('./errors');

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
const OPTIONAL_KEYS = ['platform', 'pcr_waivers', 'hpke_suites', 'allowed_embedding_model_digests'];
const SUITE_NAMES = ['mlkem768-x25519', 'x25519'];
const AK_KEYS = ['pinned_public_keys', 'certificate_roots', 'hardware_report', 'gce'];
const GCE_KEYS = {
  project_id: 'string',
  project_number: 'int',
  zone: 'string',
  instance_id: 'int',
  instance_name: 'string',
};
const PLATFORM_KEYS = ['kind', 'production', 'amd_roots', 'measurements', 'min_tcb', 'vmpl', 'allow_debug', 'azure'];
const PLATFORM_KINDS = ['azure-sev-snp', 'sev-snp', 'tdx'];
const TCB_KEYS = ['bootloader', 'tee', 'snp', 'microcode'];
const AZURE_CLAIMS = ['secure_boot', 'tpm_enabled', 'console_enabled'];
const PCR_BANKS = { sha256: { size: 32, alg: 0x000b } };
// PCRs a production policy pins and never waives (protocol/policy.py BOOT_PCRS; same words,
// since both clients print the same gap lines: tests/vectors/policy.json).
const BOOT_PCRS = new Map([
  [0, 'the firmware code (SRTM)'],
  [2, 'option ROM and UEFI driver code'],
  [4, 'the boot loader and the kernel or UKI image the firmware starts'],
  [7, 'the Secure Boot state and keys'],
  [8, 'the kernel command line (GRUB)'],
  [9, "the kernel and initrd (GRUB, and the kernel's own initrd measurement)"],
  [11, 'the UKI sections: kernel, initrd, command line (systemd-stub)'],
  [12, 'command-line overrides and credentials (systemd-stub)'],
]);
const AMD_ORGANIZATION = 'Advanced Micro Devices';
const AMD_ARK_NAMES = ['ARK-Milan', 'ARK-Genoa', 'ARK-Turin'];
const GOOGLE_ORGANIZATION = 'Google LLC';
/** The policy objects parsePolicy returned (the verifier refuses any other, copies included). */
const PARSED = new WeakSet();

const fail = (field, why) => new PolicyError(`policy field '${field}': ${why}`);
const isInt = (v) => Number.isSafeInteger(v);

function hex(value, field, size) {
  if (typeof value !== 'string' || !new RegExp(`^[0-9a-f]{${2 * size}}$`).test(value)) {
    throw fail(field, `must be ${2 * size} lowercase hex digits`);
  }
  return Buffer.from(value, 'hex');
}

function hexList(obj, field, size, { mayBeEmpty = false } = {}) {
  const value = obj[field];
  if (!Array.isArray(value) || !(value.length || mayBeEmpty)) throw fail(field, 'must be a non-empty list of hex strings');
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

/** Values of one subject attribute (e.g. 'O', 'CN') of a certificate. */
function subjectValues(cert, attr) {
  return cert.subject
    .split('\n')
    .filter((line) => line.startsWith(`${attr}=`))
    .map((line) => line.slice(attr.length + 1));
}

const isGoogleRoot = (cert) => subjectValues(cert, 'O').includes(GOOGLE_ORGANIZATION);
const isAmdArk = (cert) => {
  const orgs = subjectValues(cert, 'O');
  return orgs.length === 1 && orgs[0] === AMD_ORGANIZATION && subjectValues(cert, 'CN').some((n) => AMD_ARK_NAMES.includes(n));
};

function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function decimalKey(key, field) {
  if (!/^(0|[1-9][0-9]*)$/.test(key)) throw fail(field, 'key must be a PCR index in decimal');
  return Number(key);
}

function parseGce(value) {
  if (!isObject(value)) throw fail('ak.gce', 'must be an object');
  const unknown = Object.keys(value).filter((k) => !Object.hasOwn(GCE_KEYS, k)).sort();
  if (unknown.length) throw fail(`ak.gce.${unknown[0]}`, 'unknown key');
  const pin = {};
  for (const [key, kind] of Object.entries(GCE_KEYS)) {
    if (!(key in value)) continue;
    const item = value[key];
    if (kind === 'int') {
      // Decimal strings: GCE ids exceed 2^53, past which a JSON number would be rounded.
      if (typeof item !== 'string' || !/^(0|[1-9][0-9]*)$/.test(item) || BigInt(item) >= 2n ** 63n) {
        throw fail(`ak.gce.${key}`, 'must be a decimal string below 2^63');
      }
      pin[key] = BigInt(item);
    } else {
      if (typeof item !== 'string' || !item) throw fail(`ak.gce.${key}`, 'must be a non-empty string');
      pin[key] = item;
    }
  }
  if (!('project_id' in value) && !('project_number' in value)) {
    throw fail('ak.gce', 'must pin the project (project_id or project_number)');
  }
  return pin;
}

function parseWaivers(value, selection, workloadPcr, pcrValues) {
  if (!isObject(value)) throw fail('pcr_waivers', 'must be an object of index -> reason');
  const waivers = new Map();
  for (const [key, why] of Object.entries(value)) {
    const field = `pcr_waivers.${key}`;
    const index = decimalKey(key, field);
    if (!selection.includes(index)) throw fail(field, 'PCR is not in pcr_selection');
    if (index === workloadPcr || pcrValues.has(index)) throw fail(field, 'a pinned or workload PCR cannot be waived');
    if (BOOT_PCRS.has(index)) throw fail(field, `PCR ${index} covers ${BOOT_PCRS.get(index)}; it is never waived`);
    if (typeof why !== 'string' || !why.trim()) throw fail(field, 'must give the reason as a non-empty string');
    waivers.set(index, why);
  }
  return waivers;
}

function parsePlatform(value) {
  if (!isObject(value)) throw fail('platform', 'must be an object');
  const unknown = Object.keys(value).filter((k) => !PLATFORM_KEYS.includes(k)).sort();
  if (unknown.length) throw fail(`platform.${unknown[0]}`, 'unknown key');
  const kind = value.kind;
  if (kind === 'sev') throw fail('platform.kind', 'plain SEV without SNP is refused: it has no signed report');
  if (!PLATFORM_KINDS.includes(kind)) throw fail('platform.kind', `must be one of ${PLATFORM_KINDS.join(', ')}`);
  if (!('production' in value)) throw fail('platform.production', 'missing');
  if (typeof value.production !== 'boolean') throw fail('platform.production', 'must be true or false');
  const allowDebug = value.allow_debug ?? false;
  if (typeof allowDebug !== 'boolean') throw fail('platform.allow_debug', 'must be true or false');
  if (value.production && allowDebug) throw fail('platform.allow_debug', 'a production policy never allows debug');
  if (value.production && kind === 'tdx') throw fail('platform.kind', 'a production policy cannot name tdx');
  const rootsValue = value.amd_roots ?? [];
  if (!Array.isArray(rootsValue)) throw fail('platform.amd_roots', 'must be a list of PEM strings');
  const amdRoots = rootsValue.map((r, i) => root(r, `platform.amd_roots[${i}]`));
  if (new Set(amdRoots.map((c) => c.raw.toString('hex'))).size !== amdRoots.length) {
    throw fail('platform.amd_roots', 'has duplicates');
  }
  const rawMeasurements = value.measurements ?? [];
  if (!Array.isArray(rawMeasurements)) throw fail('platform.measurements', 'must be a list of hex strings');
  const measurements = rawMeasurements.map((m, i) => hex(m, `platform.measurements[${i}]`, 48));
  if (new Set(measurements.map((m) => m.toString('hex'))).size !== measurements.length) {
    throw fail('platform.measurements', 'has duplicates');
  }
  let minTcb = null;
  if ('min_tcb' in value) {
    const raw = value.min_tcb;
    const keys = isObject(raw) ? Object.keys(raw).sort() : [];
    if (!isObject(raw) || keys.join() !== [...TCB_KEYS].sort().join()) {
      throw fail('platform.min_tcb', `must be an object with the keys ${TCB_KEYS.join(', ')}`);
    }
    minTcb = {};
    for (const k of TCB_KEYS) {
      if (!isInt(raw[k]) || raw[k] < 0 || raw[k] > 255) throw fail(`platform.min_tcb.${k}`, 'must be an integer in 0..255');
      minTcb[k] = raw[k];
    }
  }
  let vmpl = null;
  if ('vmpl' in value) {
    if (!isInt(value.vmpl) || value.vmpl < 0 || value.vmpl > 3) throw fail('platform.vmpl', 'must be an integer in 0..3');
    if (kind === 'azure-sev-snp' && value.vmpl !== 0) {
      throw fail('platform.vmpl', 'must be 0 for azure-sev-snp: only the paravisor at VMPL 0 puts the AK in the report');
    }
    vmpl = value.vmpl;
  }
  const azure = value.azure ?? {};
  if (!isObject(azure) || Object.keys(azure).some((k) => !AZURE_CLAIMS.includes(k))) {
    throw fail('platform.azure', `must be an object with keys from ${AZURE_CLAIMS.join(', ')}`);
  }
  if (Object.keys(azure).length && kind !== 'azure-sev-snp') throw fail('platform.azure', 'only for kind azure-sev-snp');
  for (const [k, v] of Object.entries(azure)) {
    if (typeof v !== 'boolean') throw fail(`platform.azure.${k}`, 'must be true or false');
  }
  return { kind, production: value.production, amdRoots, measurements, minTcb, vmpl, allowDebug };
}

/** Everything a parsed policy leaves out that it must state, one line each, in the order and
 * words of protocol/policy.py policy_gaps ([] = complete). */
function policyGaps(p) {
  const gaps = [];
  const platform = p.platform;
  // Azure's report vouches for the AK only with the paravisor's measurement pinned.
  const azure = platform !== null && platform.kind === 'azure-sev-snp' && platform.measurements.length > 0;
  if (!p.pinnedPublicKeys.length && !p.certificateRoots.length && !azure) {
    gaps.push(
      "ak: no pinned key and no certificate root: nothing establishes AK trust (a hardware report vouches for the AK only on azure-sev-snp with the paravisor's launch measurement pinned)",
    );
  }
  if (p.gce === null && p.certificateRoots.some(isGoogleRoot)) {
    gaps.push("ak.gce: Google's vTPM CA certifies every customer's VMs; pin your project (project_id or project_number)");
  }
  if (platform !== null && !platform.amdRoots.length && platform.kind !== 'tdx') {
    gaps.push('platform.amd_roots: no AMD root (ARK) to verify the VCEK chain against');
  }
  if (platform === null || !platform.production) return gaps;
  if (p.devOnly) gaps.push('dev_only: a production policy is not a trust-on-first-use policy');
  // Python sorts the roots by DER; do the same so the indices in the gap lines agree.
  const sortedRoots = [...platform.amdRoots].sort((a, b) => Buffer.compare(a.raw, b.raw));
  sortedRoots.forEach((cert, i) => {
    if (!isAmdArk(cert)) gaps.push(`platform.amd_roots[${i}]: not an AMD ARK (a test root?)`);
  });
  if (!platform.measurements.length) gaps.push('platform.measurements: no launch measurement pinned');
  if (platform.minTcb === null) gaps.push('platform.min_tcb: no minimum TCB (bootloader, tee, snp, microcode)');
  if (platform.vmpl === null && (platform.kind === 'sev-snp' || platform.kind === 'azure-sev-snp')) {
    gaps.push('platform.vmpl: the VMPL the report must come from is not stated');
  }
  if (BOOT_PCRS.has(p.workloadPcr)) gaps.push(`workload_pcr: PCR ${p.workloadPcr} covers ${BOOT_PCRS.get(p.workloadPcr)}`);
  for (const [index, what] of BOOT_PCRS) {
    if (index === p.workloadPcr) continue;
    if (!p.pcrSelection.includes(index)) gaps.push(`pcr_selection: PCR ${index} (${what}) is not quoted`);
    else if (!p.pcrValues.has(index)) gaps.push(`pcr_values: PCR ${index} (${what}) is not pinned`);
  }
  for (const index of p.pcrSelection) {
    if (BOOT_PCRS.has(index) || index === p.workloadPcr) continue;
    if (!p.pcrValues.has(index) && !p.pcrWaivers.has(index)) {
      gaps.push(`pcr_values: PCR ${index} is selected but neither pinned nor waived`);
    }
  }
  return gaps;
}

/** The model digests a policy accepts for a model role of the event log ([] for another). */
function allowedModels(policy, role) {
  if (role === 'chat') return policy.allowedModelDigests;
  if (role === 'embeddings') return policy.allowedEmbeddingModelDigests || [];
  return [];
}

const isParsed = (policy) => policy !== null && typeof policy === 'object' && PARSED.has(policy);

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
  const unknown = Object.keys(obj).filter((k) => !KEYS.includes(k) && !OPTIONAL_KEYS.includes(k)).sort();
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
    const index = decimalKey(key, field);
    if (!selection.includes(index)) throw fail(field, 'PCR is not in pcr_selection');
    if (index === workloadPcr) throw fail(field, 'the workload PCR must not be pinned');
    pcrValues.set(index, hex(value, field, bank.size));
  }
  // Chat models and embedding models (event log roles "chat" and "embeddings"): either
  // list may be empty, not both (protocol/policy.py).
  const allowedModelDigests = hexList(obj, 'allowed_model_digests', 32, { mayBeEmpty: true });
  const allowedEmbeddingModelDigests =
    'allowed_embedding_model_digests' in obj
      ? hexList(obj, 'allowed_embedding_model_digests', 32, { mayBeEmpty: true })
      : [];
  if (!allowedModelDigests.length && !allowedEmbeddingModelDigests.length) {
    throw fail('allowed_model_digests', 'must list a model (or name embedding models)');
  }
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
  if (new Set(roots.map((c) => c.raw.toString('hex'))).size !== roots.length) {
    throw fail('ak.certificate_roots', 'has duplicates');
  }
  const gce = 'gce' in ak ? parseGce(ak.gce) : null;
  const pcrWaivers = parseWaivers(obj.pcr_waivers ?? {}, selection, workloadPcr, pcrValues);
  const ttl = obj.max_session_ttl_seconds;
  if (!isInt(ttl) || ttl < 1 || ttl > 0xffffffff) {
    throw fail('max_session_ttl_seconds', 'must be an integer in 1..4294967295');
  }
  const platform = 'platform' in obj ? parsePlatform(obj.platform) : null;
  let hpkeSuites = null;
  if ('hpke_suites' in obj) {
    const value = obj.hpke_suites;
    if (!Array.isArray(value) || !value.length) throw fail('hpke_suites', `must be a non-empty list of ${SUITE_NAMES}`);
    value.forEach((name, i) => {
      if (!SUITE_NAMES.includes(name)) throw fail(`hpke_suites[${i}]`, `must be one of ${SUITE_NAMES}`);
    });
    if (new Set(value).size !== value.length) throw fail('hpke_suites', 'has duplicates');
    hpkeSuites = [...value];
  }
  const policy = {
    pcrBank: obj.pcr_bank,
    pcrBankAlg: bank.alg,
    pcrBankSize: bank.size,
    pcrSelection: [...selection],
    pcrValues,
    workloadPcr,
    allowedModelDigests,
    allowedEmbeddingModelDigests,
    allowedRuntimeEvents,
    pinnedPublicKeys: pinned,
    certificateRoots: roots,
    maxSessionTtlSeconds: ttl,
    devOnly: obj.dev_only,
    gce,
    pcrWaivers,
    platform,
    hpkeSuites,
  };
  const gaps = policyGaps(policy);
  if (gaps.length) throw new PolicyIncompleteError(gaps);
  if (platform !== null) {
    // This client does not verify hardware reports (SEV-SNP, Azure HCL): refuse rather
    // than pass a policy whose rules it would skip.
    throw new UnsupportedPolicyError(
      `the policy's platform section (${platform.kind}) needs hardware-report verification, which this client does not implement`,
    );
  }
  Object.freeze(policy);
  PARSED.add(policy);
  return policy;
}

module.exports = {
  parsePolicy,
  parseGce,
  policyGaps,
  isParsed,
  allowedModels,
  isGoogleCertificate: isGoogleRoot,
  BOOT_PCRS,
};
