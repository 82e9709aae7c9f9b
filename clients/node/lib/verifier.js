'use strict';
// The attestation verifier: every check of docs/ATTESTATION.md's verifier, in the order and with the
// typed errors of protocol/verifier.py (docs/PROTOCOL.md, "2. Verify").
const crypto = require('node:crypto');
const E = require('./errors');
const { sha256, hash, equal } = require('./encoding');
const tpm = require('./tpm');
const eventlog = require('./eventlog');
const gce = require('./gce');
const { isParsed, isGoogleCertificate, allowedModels } = require('./policy');

const { checkGceIdentity } = gce;

const { C } = tpm;
const subtle = crypto.webcrypto.subtle;
const WEB_HASH = { [C.TPM_ALG_SHA256]: 'SHA-256', [C.TPM_ALG_SHA384]: 'SHA-384' };

const b64url = (buf) => Buffer.from(buf).toString('base64url');

function jwkOf(ak) {
  if (ak.type === C.TPM_ALG_ECC) {
    return { kty: 'EC', crv: tpm.ECC_CURVES[ak.curve].name, x: b64url(ak.x), y: b64url(ak.y) };
  }
  const e = Buffer.alloc(4);
  e.writeUInt32BE(ak.exponent);
  let start = 0;
  while (start < 3 && e[start] === 0) start++;
  return { kty: 'RSA', n: b64url(ak.modulus), e: b64url(e.subarray(start)) };
}

/** DER SubjectPublicKeyInfo of a parsed AK (what a policy pins). */
function spkiOf(ak) {
  let key;
  try {
    key = crypto.createPublicKey({ key: jwkOf(ak), format: 'jwk' });
  } catch (err) {
    throw new E.MalformedEvidenceError(`TPMT_PUBLIC.unique: not a valid public key (${err.message})`);
  }
  return key.export({ type: 'spki', format: 'der' });
}

function akFingerprint(akPublicBytes) {
  return sha256(spkiOf(tpm.parsePublic(akPublicBytes))).toString('hex');
}

const OID = {
  basicConstraints: Buffer.from('551d13', 'hex'),
  keyUsage: Buffer.from('551d0f', 'hex'),
  nameConstraints: Buffer.from('551d1e', 'hex'),
  extKeyUsage: Buffer.from('551d25', 'hex'),
  subjectKeyIdentifier: Buffer.from('551d0e', 'hex'),
  authorityKeyIdentifier: Buffer.from('551d23', 'hex'),
  certificatePolicies: Buffer.from('551d20', 'hex'),
};
const KNOWN_CA_EXTENSIONS = Object.values(OID);

/** pathLenConstraint of a CA certificate (null when absent), from its basicConstraints. */
function caRules(cert) {
  let exts;
  try {
    exts = gce.extensions(cert.raw);
  } catch {
    throw new E.AkUntrustedError('a CA certificate of the chain does not parse');
  }
  const find = (oid) => exts.find((x) => x.oid.equals(oid));
  for (const ext of exts) {
    if (ext.critical && !KNOWN_CA_EXTENSIONS.some((oid) => oid.equals(ext.oid))) {
      throw new E.AkUntrustedError('a CA certificate carries a critical extension this client does not check');
    }
  }
  if (find(OID.nameConstraints)) {
    throw new E.AkUntrustedError('name constraints are not checked by this client: refused');
  }
  const usage = find(OID.keyUsage);
  // keyUsage BIT STRING: [unused bits][bits...]; keyCertSign is bit 5 (0x04 in the first byte).
  const bits = usage ? gce.take(usage.value, 0x03)[0] : null;
  if (!bits || bits.length < 2 || !(bits[1] & 0x04)) {
    throw new E.AkUntrustedError('a CA certificate of the chain may not sign certificates (keyUsage)');
  }
  const basic = find(OID.basicConstraints);
  if (!basic) throw new E.AkUntrustedError('a CA certificate of the chain has no basicConstraints');
  let [seq] = gce.take(basic.value, 0x30);
  if (seq.length && seq[0] === 0x01) seq = gce.take(seq, 0x01)[1];
  if (!seq.length) return null;
  const [len] = gce.take(seq, 0x02);
  return len.reduce((acc, byte) => acc * 256 + byte, 0);
}

/** The CA certificates of a validated path, leaf excluded, each with the number of CA
 * certificates below it (RFC 5280's pathLenConstraint counts those). */
function checkCaPath(cas) {
  cas.forEach((cert, below) => {
    const pathLen = caRules(cert);
    if (pathLen !== null && below > pathLen) {
      throw new E.AkUntrustedError('the chain is longer than a CA certificate allows (pathLenConstraint)');
    }
  });
}

function checkCertificateChain(chain, roots, akSpki, gcePinned) {
  let certs;
  try {
    certs = chain.map((der) => new crypto.X509Certificate(Buffer.from(der)));
  } catch {
    throw new E.AkUntrustedError('the AK certificate chain does not parse as DER');
  }
  const leafSpki = certs[0].publicKey.export({ type: 'spki', format: 'der' });
  if (!equal(leafSpki, akSpki)) throw new E.AkUntrustedError('the AK certificate is for another key');
  const now = Date.now();
  const current = (c) => Date.parse(c.validFrom) <= now && now <= Date.parse(c.validTo);
  for (let i = 0; i < certs.length; i++) {
    const cert = certs[i];
    if (!current(cert)) throw new E.AkUntrustedError('a certificate of the chain is not valid now');
    if (i > 0 && !cert.ca) throw new E.AkUntrustedError('an intermediate is not a CA');
    if (i + 1 < certs.length) {
      const issuer = certs[i + 1];
      if (!cert.checkIssued(issuer) || !cert.verify(issuer.publicKey)) {
        throw new E.AkUntrustedError('the AK certificate chain does not validate');
      }
    }
  }
  const top = certs[certs.length - 1];
  for (const rootCert of roots) {
    let path = null;
    if (top.raw.equals(rootCert.raw) && certs.length > 1) path = certs.slice(1);
    else if (rootCert.ca && current(rootCert) && top.checkIssued(rootCert) && top.verify(rootCert.publicKey)) {
      path = [...certs.slice(1), rootCert];
    }
    if (path === null) continue;
    checkCaPath(path);
    if (!gcePinned && [...certs, rootCert].some(isGoogleCertificate)) {
      throw new E.AkUntrustedError("the AK certificate chain runs through Google's vTPM CA; the policy must pin the GCE project (ak.gce)");
    }
    return rootCert.subject;
  }
  throw new E.AkUntrustedError('the AK certificate chain does not lead to a policy root');
}

function checkAkAttributes(ak) {
  const required = {
    restricted: C.RESTRICTED,
    sign: C.SIGN_ENCRYPT,
    fixedTPM: C.FIXED_TPM,
    fixedParent: C.FIXED_PARENT,
  };
  const missing = Object.entries(required)
    .filter(([, bit]) => (ak.attributes & bit) !== bit)
    .map(([n]) => n);
  if (missing.length) throw new E.AkAttributesError(`objectAttributes lack ${missing.join(', ')}`);
  if (ak.attributes & C.DECRYPT) throw new E.AkAttributesError('objectAttributes allow decrypt');
  if (ak.symmetric.algorithm !== C.TPM_ALG_NULL) {
    throw new E.AkAttributesError('a signing key must have a NULL symmetric algorithm');
  }
  if (ak.scheme === C.TPM_ALG_NULL) {
    throw new E.AkAttributesError('a restricted signing key must fix its signing scheme');
  }
}

function checkScheme(ak, sig) {
  const fits =
    ak.type === C.TPM_ALG_ECC
      ? sig.sigAlg === C.TPM_ALG_ECDSA
      : sig.sigAlg === C.TPM_ALG_RSASSA || sig.sigAlg === C.TPM_ALG_RSAPSS;
  if (!fits) throw new E.SignatureError('the signature algorithm does not fit the key');
  if (sig.sigAlg !== ak.scheme || sig.hashAlg !== ak.schemeHash) {
    throw new E.SignatureError("the signature is not the key's own scheme");
  }
}

function fixedWidth(value, size) {
  let v = Buffer.from(value);
  while (v.length > size && v[0] === 0) v = v.subarray(1);
  if (v.length > size) return null;
  return Buffer.concat([Buffer.alloc(size - v.length), v]);
}

async function verifySignature(ak, sig, message) {
  const webHash = WEB_HASH[sig.hashAlg];
  const jwk = jwkOf(ak);
  let ok = false;
  if (ak.type === C.TPM_ALG_ECC) {
    const { name: curve, size } = tpm.ECC_CURVES[ak.curve];
    const r = fixedWidth(sig.r, size);
    const s = fixedWidth(sig.s, size);
    if (r && s) {
      const key = await subtle.importKey('jwk', jwk, { name: 'ECDSA', namedCurve: curve }, false, [
        'verify',
      ]);
      ok = await subtle.verify({ name: 'ECDSA', hash: webHash }, key, Buffer.concat([r, s]), message);
    }
  } else {
    if (sig.rsaSignature.length !== ak.keyBits / 8) {
      throw new E.SignatureError('RSA signature length differs from the modulus length');
    }
    if (sig.sigAlg === C.TPM_ALG_RSASSA) {
      const key = await subtle.importKey('jwk', jwk, { name: 'RSASSA-PKCS1-v1_5', hash: webHash }, false, [
        'verify',
      ]);
      ok = await subtle.verify('RSASSA-PKCS1-v1_5', key, sig.rsaSignature, message);
    } else {
      // The TPM's salt length: the digest length, or the maximum (any salt, as Python's AUTO).
      const key = await subtle.importKey('jwk', jwk, { name: 'RSA-PSS', hash: webHash }, false, ['verify']);
      const hLen = sig.hashAlg === C.TPM_ALG_SHA256 ? 32 : 48;
      for (const saltLength of [hLen, ak.keyBits / 8 - hLen - 2]) {
        ok ||= await subtle.verify({ name: 'RSA-PSS', saltLength }, key, sig.rsaSignature, message);
      }
    }
  }
  if (!ok) throw new E.SignatureError('the signature does not verify over TPMS_ATTEST');
}

function checkSelection(ev, policy, quote) {
  const banks = quote.pcrSelect;
  if (banks.some((b) => b.hashAlg === C.TPM_ALG_SHA1) || ev.pcrHashAlgorithm === C.TPM_ALG_SHA1) {
    throw new E.PcrSelectionError('a SHA-1 PCR bank is refused');
  }
  if (ev.pcrHashAlgorithm !== policy.pcrBankAlg) {
    throw new E.PcrSelectionError("the evidence bank is not the policy's");
  }
  if (banks.length !== 1 || banks[0].hashAlg !== policy.pcrBankAlg) {
    throw new E.PcrSelectionError(`the quoted banks are not exactly ${policy.pcrBank}`);
  }
  if (banks[0].indices.join(',') !== policy.pcrSelection.join(',')) {
    throw new E.PcrSelectionError(
      `quoted PCRs [${banks[0].indices}] differ from the policy's [${policy.pcrSelection}]`,
    );
  }
}

function checkPcrDigest(ev, policy, quote, digestAlg) {
  const values = ev.pcrValues;
  const shipped = [...values.keys()].sort((a, b) => a - b);
  if (shipped.join(',') !== policy.pcrSelection.join(',')) {
    throw new E.PcrDigestError(`shipped PCR values [${shipped}] do not cover exactly the selection`);
  }
  for (const index of policy.pcrSelection) {
    if (values.get(index).length !== policy.pcrBankSize) {
      throw new E.PcrDigestError(`PCR ${index} value is not ${policy.pcrBankSize} bytes`);
    }
  }
  const computed = hash(
    tpm.HASH_NAMES[digestAlg],
    Buffer.concat(policy.pcrSelection.map((i) => values.get(i))),
  );
  if (!equal(computed, quote.pcrDigest)) {
    throw new E.PcrDigestError('pcrDigest does not match the shipped values');
  }
  return values;
}

/**
 * Split the log into start-ups (protocol/verifier.py _check_sequence): one or more model
 * events (canonical {"digest","role"} JSON, roles in MODEL_ROLES order, none twice), then one
 * runtime event in canonical JSON (an object). Returns [{models, runtime}], `models` a frozen
 * object role -> digest (Buffer) in MODEL_ROLES order; EventSequenceError otherwise.
 */
function checkSequence(records) {
  if (!records.length) throw new E.EventSequenceError('the log has no start-up');
  const startups = [];
  let models = {};
  for (const record of records) {
    const n = startups.length;
    if (record.eventType === eventlog.EVENT_MODEL) {
      let parsed;
      try {
        parsed = eventlog.parseModelEvent(record.data);
      } catch (err) {
        if (!(err instanceof E.EventLogFormatError)) throw err;
        throw new E.EventSequenceError(`start-up ${n}: ${err.detail}`);
      }
      const order = eventlog.MODEL_ROLES.indexOf(parsed.role);
      if (Object.keys(models).some((seen) => eventlog.MODEL_ROLES.indexOf(seen) >= order)) {
        throw new E.EventSequenceError(`start-up ${n} measures '${parsed.role}' out of order or twice`);
      }
      models[parsed.role] = parsed.digest;
      continue;
    }
    if (!Object.keys(models).length) {
      throw new E.EventSequenceError(`start-up ${n} has no model event before its runtime event`);
    }
    checkRuntime(record, n);
    startups.push({ models: Object.freeze(models), runtime: record });
    models = {};
  }
  if (Object.keys(models).length) {
    throw new E.EventSequenceError(`start-up ${startups.length} ends without its runtime event`);
  }
  return startups;
}

function checkRuntime(runtime, n) {
  if (runtime.eventType !== eventlog.EVENT_RUNTIME) {
    throw new E.EventSequenceError(`start-up ${n} has ${runtime.eventType} there`);
  }
  let check;
  try {
    check = eventlog.canonicalCheck(runtime.data.toString('latin1'));
  } catch {
    throw new E.EventSequenceError(`start-up ${n} runtime event is not JSON`);
  }
  if (check.kind !== 'object' || !check.canonical) {
    throw new E.EventSequenceError(`start-up ${n} runtime event is not a canonical JSON object`);
  }
}

/**
 * Verify evidence against a policy; throw the first failed check's typed error.
 * evidence: {quoteAttest, quoteSignature, akPublic, akCertificateChain: [Buffer],
 *            pcrHashAlgorithm, pcrValues: Map<int, Buffer>, workloadEventLog}
 * Returns what the quote proved, with the step-by-step report.
 */
async function verify(ev, policy, { expectedQualifyingData, sessionTtlSeconds }) {
  if (!expectedQualifyingData || !expectedQualifyingData.length) {
    throw new TypeError('expectedQualifyingData must be non-empty bytes');
  }
  const report = [];
  const ok = (name, detail) => report.push({ name, passed: true, detail });
  let step = 'start';
  try {
    step = 'policy';
    // Completeness and the rules this client implements are enforced by parsePolicy, which
    // marks what it returns; a hand-built object may skip them, so it is refused.
    if (!isParsed(policy)) throw new E.PolicyIncompleteError(['policy: not made by parsePolicy']);
    ok(step, 'complete (parsePolicy)');

    step = 'ak_parse';
    const ak = tpm.parsePublic(ev.akPublic);
    const akSpki = spkiOf(ak);
    const fingerprint = sha256(akSpki).toString('hex');
    ok(step, `fingerprint ${fingerprint}`);

    step = 'ak_trust';
    if (policy.pinnedPublicKeys.some((k) => k.equals(akSpki))) {
      ok(step, `AK ${fingerprint} is pinned by the policy`);
    } else if (policy.certificateRoots.length && ev.akCertificateChain.length) {
      const root = checkCertificateChain(ev.akCertificateChain, policy.certificateRoots, akSpki, policy.gce !== null);
      const identity = checkGceIdentity(ev.akCertificateChain[0], policy.gce);
      ok(step, `AK ${fingerprint} certified by a chain to ${root}${identity}`);
    } else {
      throw new E.AkUntrustedError(`AK ${fingerprint} is not pinned by the policy`);
    }

    step = 'ak_attributes';
    checkAkAttributes(ak);
    ok(step, `objectAttributes 0x${ak.attributes.toString(16)}`);

    step = 'signature_parse';
    const sig = tpm.parseSignature(ev.quoteSignature);
    checkScheme(ak, sig);
    ok(step, "the signature's scheme is the key's");

    step = 'signature';
    await verifySignature(ak, sig, ev.quoteAttest);
    ok(step, `signature over ${ev.quoteAttest.length} TPMS_ATTEST bytes verifies`);

    step = 'attest_parse';
    const attest = tpm.parseAttest(ev.quoteAttest);
    ok(step, `TPMS_ATTEST of ${ev.quoteAttest.length} bytes`);

    step = 'magic';
    if (attest.magic !== C.TPM_GENERATED_VALUE) throw new E.AttestMagicError('magic is not TPM_GENERATED_VALUE');
    ok(step, 'magic 0xff544347');

    step = 'attest_type';
    if (attest.type !== C.TPM_ST_ATTEST_QUOTE || !attest.quote) {
      throw new E.AttestTypeError(`type 0x${attest.type.toString(16)} is not a quote`);
    }
    const quote = attest.quote;
    ok(step, 'type 0x8018 (quote)');

    step = 'qualified_signer';
    const signer = attest.qualifiedSigner;
    if (!signer.equals(tpm.name(ak)) && !tpm.qualifiedNames(ak).some((n) => n.equals(signer))) {
      throw new E.QualifiedSignerError("qualifiedSigner is neither the AK's name nor its qualified name");
    }
    ok(step, 'qualifiedSigner names the AK');

    step = 'qualifying_data';
    if (!equal(attest.extraData, expectedQualifyingData)) {
      throw new E.NonceMismatchError('extraData differs from the expected qualifying data');
    }
    ok(step, 'extraData equals the expected qualifying data');

    step = 'pcr_selection';
    checkSelection(ev, policy, quote);
    ok(step, `bank ${policy.pcrBank}, PCRs [${policy.pcrSelection}]`);

    step = 'pcr_digest';
    const values = checkPcrDigest(ev, policy, quote, sig.hashAlg);
    ok(step, 'pcrDigest matches the shipped values');

    step = 'pcr_value';
    for (const [index, expected] of policy.pcrValues) {
      if (!equal(values.get(index), expected)) {
        throw new E.PcrValueError(`PCR ${index} is not the value the policy pins`);
      }
    }
    ok(step, 'pinned PCRs have their values');

    step = 'event_log_format';
    const records = eventlog.parse(ev.workloadEventLog);
    ok(step, `${records.length} records`);

    step = 'event_digest';
    for (const record of records) {
      if (record.pcr !== policy.workloadPcr) {
        throw new E.EventDigestError(`record ${record.recnum} is not for the workload PCR`);
      }
      if (!equal(record.digest, eventlog.eventDigest(record.eventType, record.data))) {
        throw new E.EventDigestError(`record ${record.recnum} digest does not match its content`);
      }
    }
    ok(step, 'digests recomputed from content');

    step = 'event_log_replay';
    const workloadValue = values.get(policy.workloadPcr);
    if (!equal(eventlog.replay(records), workloadValue)) {
      throw new E.EventLogReplayError(`the log does not replay to PCR ${policy.workloadPcr}`);
    }
    ok(step, `replays to PCR ${policy.workloadPcr}`);

    step = 'event_sequence';
    const startups = checkSequence(records);
    ok(step, `${startups.length} start-up(s) of [model..., runtime]; the last is running`);

    step = 'model_digest';
    startups.forEach(({ models }, i) => {
      for (const [role, digest] of Object.entries(models)) {
        if (!allowedModels(policy, role).some((d) => d.equals(digest))) {
          throw new E.ModelNotAllowedError(`start-up ${i} ${role} model digest ${digest.toString('hex')} is not allowed`);
        }
      }
    });
    const running = startups[startups.length - 1].models;
    ok(step, `model digests allowed: ${Object.entries(running).map(([r, d]) => `${r} ${d.toString('hex')}`).join(', ')}`);

    step = 'runtime_event';
    startups.forEach(({ runtime }, i) => {
      if (!policy.allowedRuntimeEvents.some((d) => d.equals(sha256(runtime.data)))) {
        throw new E.RuntimeNotAllowedError(`start-up ${i} runtime event is not allowed`);
      }
    });
    ok(step, 'runtime event allowed');

    step = 'session_ttl';
    const ttl = sessionTtlSeconds;
    if (!Number.isSafeInteger(ttl) || ttl <= 0) throw new E.SessionTtlError('TTL is not a positive integer');
    if (ttl > policy.maxSessionTtlSeconds) throw new E.SessionTtlError("TTL exceeds the policy's maximum");
    ok(step, `session TTL ${ttl} s`);

    const { models, runtime } = startups[startups.length - 1];
    return {
      akFingerprint: fingerprint,
      akSpki,
      workloadPcr: policy.workloadPcr,
      workloadPcrValue: workloadValue,
      // role ("chat", "embeddings") -> digest, of the last (running) start-up
      models,
      // the running chat model's digest; empty when the server serves embeddings only
      modelDigest: models[eventlog.ROLE_CHAT] || Buffer.alloc(0),
      runtimeEvent: runtime.data,
      events: records,
      attestDigest: sha256(ev.quoteAttest),
      clock: attest.clock,
      resetCount: attest.resetCount,
      restartCount: attest.restartCount,
      firmwareVersion: attest.firmwareVersion,
      report,
    };
  } catch (err) {
    if (err instanceof E.VerificationError) {
      report.push({ name: step, passed: false, detail: err.detail });
      err.report = report;
    }
    throw err;
  }
}

module.exports = { verify, spkiOf, akFingerprint, checkCertificateChain, checkSequence };
