'use strict';
// Google's instance identity in a GCE vTPM AK certificate (extension 1.3.6.1.4.1.11129.2.1.21),
// checked against a policy's ak.gce pin as protocol/verifier.py check_gce_identity does.
const crypto = require('node:crypto');
const E = require('./errors');

// DER of the OID 1.3.6.1.4.1.11129.2.1.21.
const GCE_IDENTITY_OID = Buffer.from('2b06010401d679020115', 'hex');

class DerError extends Error {}

/** [content, rest] of one DER element with `tag` at the start of `data`. */
function take(data, tag) {
  if (data.length < 2 || data[0] !== tag) throw new DerError(`expected DER tag 0x${tag.toString(16)}`);
  let length = data[1];
  let offset = 2;
  if (length & 0x80) {
    const count = length & 0x7f;
    if (count === 0 || count > 4 || data.length < 2 + count) throw new DerError('bad DER length');
    length = data.subarray(2, 2 + count).reduce((acc, byte) => acc * 256 + byte, 0);
    offset = 2 + count;
    if (length < 0x80 || data[2] === 0) throw new DerError('non-minimal DER length');
  }
  if (data.length < offset + length) throw new DerError('DER element runs past its container');
  return [data.subarray(offset, offset + length), data.subarray(offset + length)];
}

/** Skip one element of any tag. */
function skip(data) {
  if (data.length < 1) throw new DerError('missing DER element');
  return take(data, data[0])[1];
}

function skipAll(data) {
  let rest = data;
  while (rest.length) rest = skip(rest);
}

/** Every extension of a certificate: [{ oid: Buffer, critical: boolean, value: Buffer }]. */
function extensions(certDer) {
  const [certificate] = take(certDer, 0x30);
  let [tbs] = take(certificate, 0x30);
  if (tbs[0] === 0xa0) tbs = skip(tbs); // version
  for (let i = 0; i < 6; i++) tbs = skip(tbs); // serial, signature, issuer, validity, subject, spki
  const out = [];
  while (tbs.length) {
    if (tbs[0] !== 0xa3) {
      tbs = skip(tbs); // issuerUniqueID [1], subjectUniqueID [2]
      continue;
    }
    const [wrapped] = take(tbs, 0xa3);
    let [list] = take(wrapped, 0x30);
    while (list.length) {
      let ext;
      [ext, list] = take(list, 0x30);
      let oid;
      [oid, ext] = take(ext, 0x06);
      let critical = false;
      if (ext[0] === 0x01) {
        const [flag, rest] = take(ext, 0x01);
        critical = flag.length === 1 && flag[0] === 0xff;
        ext = rest;
      }
      const [value] = take(ext, 0x04);
      out.push({ oid, critical, value });
    }
    break;
  }
  return out;
}

/** The raw value of the certificate extension with this OID, or null. */
function extensionValue(certDer, oid) {
  const [certificate] = take(certDer, 0x30);
  let [tbs] = take(certificate, 0x30);
  if (tbs[0] === 0xa0) tbs = skip(tbs); // version
  for (let i = 0; i < 6; i++) tbs = skip(tbs); // serial, signature, issuer, validity, subject, spki
  while (tbs.length) {
    if (tbs[0] !== 0xa3) {
      tbs = skip(tbs); // issuerUniqueID [1], subjectUniqueID [2]
      continue;
    }
    const [wrapped] = take(tbs, 0xa3);
    let [list] = take(wrapped, 0x30);
    while (list.length) {
      let ext;
      [ext, list] = take(list, 0x30);
      let id;
      [id, ext] = take(ext, 0x06);
      if (ext[0] === 0x01) ext = skip(ext); // critical
      const [value] = take(ext, 0x04);
      if (id.equals(oid)) return value;
    }
    return null;
  }
  return null;
}

function utf8(data) {
  const [content, rest] = take(data, 0x0c);
  return [new TextDecoder('utf-8', { fatal: true }).decode(content), rest];
}

function integer(data) {
  const [content, rest] = take(data, 0x02);
  if (!content.length || (content.length > 1 && content[0] === (content[1] & 0x80 ? 0xff : 0))) {
    throw new DerError('non-minimal DER integer');
  }
  if (content.length > 9) throw new DerError('integer too large');
  return [BigInt.asIntN(content.length * 8, BigInt(`0x${content.toString('hex')}`)), rest];
}

/** Parse the extension's value (protocol/hardware/gce.py has the ASN.1). */
function parseIdentity(der) {
  let [body, rest] = take(der, 0x30);
  if (rest.length) throw new DerError('trailing bytes after the identity');
  const identity = {};
  [identity.zone, body] = utf8(body);
  [identity.project_number, body] = integer(body);
  [identity.project_id, body] = utf8(body);
  [identity.instance_id, body] = integer(body);
  [identity.instance_name, body] = utf8(body);
  identity.isProduction = false;
  if (body.length) {
    let wrapped;
    [wrapped, body] = take(body, 0xa0);
    let [props, tail] = take(wrapped, 0x30);
    if (tail.length) throw new DerError('trailing bytes after the security properties');
    if (props.length && props[0] === 0xa0) {
      let version;
      [version, props] = take(props, 0xa0);
      if (integer(version)[1].length) throw new DerError('malformed securityVersion');
    }
    if (props.length && props[0] === 0xa1) {
      let flag;
      [flag, props] = take(props, 0xa1);
      const [value, extra] = take(flag, 0x01);
      if (extra.length || value.length !== 1 || (value[0] !== 0 && value[0] !== 0xff)) {
        throw new DerError('malformed isProduction');
      }
      identity.isProduction = value[0] === 0xff;
    }
    // Later properties ([2], [3], ...) and later fields: checked well-formed, then skipped,
    // as Go's encoding/asn1 (go-tpm-tools) skips what it does not know.
    skipAll(props);
  }
  skipAll(body);
  return identity;
}

/** The AK certificate's GCE identity must match the pin; a GCE certificate needs a pin. */
function checkGceIdentity(leafDer, pin) {
  let identity = null;
  try {
    new crypto.X509Certificate(leafDer); // eslint-disable-line no-new
    const value = extensionValue(Buffer.from(leafDer), GCE_IDENTITY_OID);
    identity = value === null ? null : parseIdentity(value);
  } catch (err) {
    throw new E.AkUntrustedError(`the AK certificate's GCE identity does not parse: ${err.message}`);
  }
  if (pin === null) {
    if (identity !== null) {
      throw new E.AkUntrustedError('the AK certificate is a GCE one; the policy must pin the project (ak.gce)');
    }
    return '';
  }
  if (identity === null) throw new E.AkUntrustedError('the AK certificate carries no GCE instance identity');
  if (!identity.isProduction) throw new E.AkUntrustedError("the AK certificate's GCE identity is not marked production");
  for (const [name, wanted] of Object.entries(pin)) {
    if (identity[name] !== wanted) {
      throw new E.AkUntrustedError(`the AK certificate is for GCE ${name} ${identity[name]}, the policy pins ${wanted}`);
    }
  }
  return `, GCE project ${identity.project_id} (${identity.project_number}) instance ${identity.instance_name} (${identity.instance_id}) in ${identity.zone}`;
}

module.exports = { checkGceIdentity, parseIdentity, extensionValue, extensions, take, DerError };
