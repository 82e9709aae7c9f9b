'use strict';
// The workload event log (CEL-JSON lines), event digests and PCR replay, and the
// canonical JSON check of the runtime event (docs/PROTOCOL.md, "The workload event log").
//
// The event types (protocol/eventlog.py):
// - "model": one per served model; data is the canonical JSON
//   {"digest":"<64 lowercase hex: the model manifest's digest>","role":"chat"|"embeddings"}.
// - "runtime": data is the canonical JSON of the runtime event.
// A start-up is its model events, roles in the order of MODEL_ROLES and none twice, then one
// runtime event (verifier.checkSequence).
const { EventLogFormatError } = require('./errors');
const { encode, sha256 } = require('./encoding');

const EVENT_MODEL = 'model';
const EVENT_RUNTIME = 'runtime';
const EVENT_TYPES = new Set([EVENT_MODEL, EVENT_RUNTIME]);
const ROLE_CHAT = 'chat';
const ROLE_EMBEDDINGS = 'embeddings';
/** The model roles, in the order a start-up measures them. */
const MODEL_ROLES = Object.freeze([ROLE_CHAT, ROLE_EMBEDDINGS]);
const RECORD_KEYS = ['content', 'content_type', 'digests', 'pcr', 'recnum'];

function measuredBytes(eventType, data) {
  return encode('encloud/v1 event', Buffer.from(eventType, 'ascii'), data);
}

function eventDigest(eventType, data) {
  return sha256(measuredBytes(eventType, data));
}

function extend(pcr, digest) {
  return sha256(Buffer.concat([pcr, digest]));
}

function replay(records, initial = Buffer.alloc(32)) {
  return records.reduce((value, record) => extend(value, record.digest), initial);
}

function recordLine(recnum, pcr, digest, eventType, data) {
  return (
    `{"content":{"data":"${data.toString('hex')}","event_type":"${eventType}"},` +
    `"content_type":"encloud","digests":[{"digest":"${digest.toString('hex')}",` +
    `"hashAlg":"sha256"}],"pcr":${pcr},"recnum":${recnum}}`
  );
}

function sameKeys(obj, keys) {
  return (
    obj !== null &&
    typeof obj === 'object' &&
    !Array.isArray(obj) &&
    Object.keys(obj).sort().join(',') === [...keys].sort().join(',')
  );
}

function hexField(value, where) {
  if (typeof value !== 'string' || !/^([0-9a-f]{2})*$/.test(value)) {
    throw new EventLogFormatError(`${where} has a field that is not lowercase hex`);
  }
  return Buffer.from(value, 'hex');
}

function parseRecord(line, index) {
  const where = `record ${index}`;
  if (!/^[\x00-\x7f]*$/.test(line)) throw new EventLogFormatError(`${where} is not ASCII`);
  let obj;
  try {
    obj = JSON.parse(line);
  } catch {
    throw new EventLogFormatError(`${where} is not JSON`);
  }
  if (!sameKeys(obj, RECORD_KEYS)) throw new EventLogFormatError(`${where} has the wrong keys`);
  const { recnum, pcr, digests, content_type: contentType, content } = obj;
  const isUint = (v) => Number.isSafeInteger(v) && v >= 0;
  if (!isUint(recnum) || !isUint(pcr) || pcr > 23) {
    throw new EventLogFormatError(`${where} has an invalid recnum or pcr`);
  }
  if (contentType !== 'encloud') throw new EventLogFormatError(`${where} content_type`);
  if (
    !Array.isArray(digests) ||
    digests.length !== 1 ||
    !sameKeys(digests[0], ['digest', 'hashAlg']) ||
    digests[0].hashAlg !== 'sha256'
  ) {
    throw new EventLogFormatError(`${where} must carry exactly one sha256 digest`);
  }
  const digest = hexField(digests[0].digest, where);
  if (digest.length !== 32) throw new EventLogFormatError(`${where} digest is not 32 bytes`);
  if (!sameKeys(content, ['data', 'event_type'])) {
    throw new EventLogFormatError(`${where} content must have exactly event_type and data`);
  }
  if (!EVENT_TYPES.has(content.event_type)) {
    throw new EventLogFormatError(`${where} has an unknown event_type`);
  }
  const data = hexField(content.data, where);
  if (recordLine(recnum, pcr, digest, content.event_type, data) !== line) {
    throw new EventLogFormatError(`${where} is not in canonical form`);
  }
  return { recnum, pcr, digest, eventType: content.event_type, data };
}

/** Parse a log strictly: every line canonical, ending in "\n", recnums 0.. without gaps. */
function parse(data) {
  const text = Buffer.from(data).toString('latin1');
  if (!text.length) return [];
  if (!text.endsWith('\n')) throw new EventLogFormatError('log does not end with a newline');
  return text
    .slice(0, -1)
    .split('\n')
    .map((line, index) => {
      const record = parseRecord(line, index);
      if (record.recnum !== index) {
        throw new EventLogFormatError(`record ${index} has recnum ${record.recnum}`);
      }
      return record;
    });
}

/** The data of the event measuring one served model: canonical {"digest","role"} JSON. */
function modelEvent(role, digest) {
  digest = Buffer.from(digest);
  if (!MODEL_ROLES.includes(role) || digest.length !== 32) {
    throw new RangeError(`a model event needs a role in ${MODEL_ROLES.join(', ')} and a 32-byte digest`);
  }
  return { eventType: EVENT_MODEL, data: Buffer.from(`{"digest":"${digest.toString('hex')}","role":"${role}"}`, 'ascii') };
}

/**
 * {role, digest} of a model event's data; EventLogFormatError unless it is exactly the
 * canonical JSON modelEvent writes: ASCII, the keys digest and role only, a known role,
 * a digest of 64 lowercase hex digits.
 */
function parseModelEvent(data) {
  data = Buffer.from(data);
  if (data.some((byte) => byte > 0x7f)) throw new EventLogFormatError('a model event is not ASCII JSON');
  const text = data.toString('latin1');
  let obj;
  try {
    obj = JSON.parse(text);
  } catch {
    throw new EventLogFormatError('a model event is not ASCII JSON');
  }
  if (!sameKeys(obj, ['digest', 'role'])) {
    throw new EventLogFormatError('a model event must have exactly digest and role');
  }
  const { role, digest } = obj;
  if (!MODEL_ROLES.includes(role)) throw new EventLogFormatError('a model event has an unknown role');
  if (typeof digest !== 'string' || !/^[0-9a-f]{64}$/.test(digest)) {
    throw new EventLogFormatError('a model event is not a canonical 32-byte digest');
  }
  // The canonical form of {digest, role} with these values, byte for byte (sorted keys, no
  // whitespace): anything else (key order, spaces, escapes, duplicate keys) is refused.
  if (text !== `{"digest":"${digest}","role":"${role}"}`) {
    throw new EventLogFormatError('a model event is not a canonical 32-byte digest');
  }
  return { role, digest: Buffer.from(digest, 'hex') };
}

/** Role -> the sorted distinct digests the records' model events measured (records as
 * parse() returns them, or {eventType, data} events). */
function loggedModels(records) {
  const found = new Map();
  for (const record of records) {
    if (record.eventType !== EVENT_MODEL) continue;
    const { role, digest } = parseModelEvent(record.data);
    if (!found.has(role)) found.set(role, new Map());
    found.get(role).set(digest.toString('hex'), digest);
  }
  const out = {};
  for (const role of MODEL_ROLES) {
    if (found.has(role)) out[role] = [...found.get(role).values()].sort(Buffer.compare);
  }
  return out;
}

// --- canonical JSON: what Python's json.dumps(sort_keys=True, separators=(",", ":"),
// ensure_ascii=True) writes for the value json.loads reads ------------------------------

class JsonSyntaxError extends Error {}

function parseLoose(text) {
  let i = 0;
  const ws = () => {
    while (i < text.length && ' \t\n\r'.includes(text[i])) i++;
  };
  const fail = () => {
    throw new JsonSyntaxError(`invalid JSON at ${i}`);
  };
  function value() {
    ws();
    const c = text[i];
    if (c === '{') {
      i++;
      const map = new Map();
      ws();
      if (text[i] === '}') {
        i++;
        return { kind: 'object', map };
      }
      for (;;) {
        ws();
        if (text[i] !== '"') fail();
        const key = string();
        ws();
        if (text[i++] !== ':') fail();
        map.set(key, value());
        ws();
        if (text[i] === ',') {
          i++;
          continue;
        }
        if (text[i++] === '}') return { kind: 'object', map };
        fail();
      }
    }
    if (c === '[') {
      i++;
      const items = [];
      ws();
      if (text[i] === ']') {
        i++;
        return { kind: 'array', items };
      }
      for (;;) {
        items.push(value());
        ws();
        if (text[i] === ',') {
          i++;
          continue;
        }
        if (text[i++] === ']') return { kind: 'array', items };
        fail();
      }
    }
    if (c === '"') return { kind: 'string', value: string() };
    for (const lit of ['true', 'false', 'null', 'NaN', 'Infinity', '-Infinity']) {
      if (text.startsWith(lit, i)) {
        i += lit.length;
        return { kind: 'literal', value: lit };
      }
    }
    const m = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?/.exec(text.slice(i));
    if (!m) fail();
    i += m[0].length;
    return { kind: 'number', lexeme: m[0], integer: !m[2] && !m[3] };
  }
  function string() {
    i++;
    let out = '';
    for (;;) {
      if (i >= text.length) fail();
      const ch = text[i++];
      if (ch === '"') return out;
      if (ch.charCodeAt(0) < 0x20) fail();
      if (ch !== '\\') {
        out += ch;
        continue;
      }
      const e = text[i++];
      const simple = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };
      if (e in simple) out += simple[e];
      else if (e === 'u' && /^[0-9a-fA-F]{4}$/.test(text.slice(i, i + 4))) {
        out += String.fromCharCode(parseInt(text.slice(i, i + 4), 16));
        i += 4;
      } else fail();
    }
  }
  const v = value();
  ws();
  if (i !== text.length) fail();
  return v;
}

function pyFloatRepr(x) {
  if (Number.isNaN(x)) return 'NaN';
  if (x === Infinity) return 'Infinity';
  if (x === -Infinity) return '-Infinity';
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const sign = x < 0 ? '-' : '';
  const [mantissa, expText] = Math.abs(x).toExponential().split('e');
  const digits = mantissa.replace('.', '');
  const exp = Number(expText);
  if (exp < -4 || exp >= 16) {
    const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    const e = String(Math.abs(exp)).padStart(2, '0');
    return `${sign}${m}e${exp < 0 ? '-' : '+'}${e}`;
  }
  if (exp < 0) return `${sign}0.${'0'.repeat(-exp - 1)}${digits}`;
  if (digits.length <= exp + 1) return `${sign}${digits}${'0'.repeat(exp + 1 - digits.length)}.0`;
  return `${sign}${digits.slice(0, exp + 1)}.${digits.slice(exp + 1)}`;
}

function pyString(s) {
  let out = '"';
  for (let k = 0; k < s.length; k++) {
    const c = s.charCodeAt(k);
    const named = { 0x22: '\\"', 0x5c: '\\\\', 0x0a: '\\n', 0x0d: '\\r', 0x09: '\\t', 0x08: '\\b', 0x0c: '\\f' };
    if (named[c]) out += named[c];
    else if (c >= 0x20 && c <= 0x7e) out += s[k];
    else out += `\\u${c.toString(16).padStart(4, '0')}`;
  }
  return `${out}"`;
}

function codePointCompare(a, b) {
  const x = Array.from(a, (ch) => ch.codePointAt(0));
  const y = Array.from(b, (ch) => ch.codePointAt(0));
  for (let k = 0; k < Math.min(x.length, y.length); k++) if (x[k] !== y[k]) return x[k] - y[k];
  return x.length - y.length;
}

function dumpCanonical(v) {
  switch (v.kind) {
    case 'object':
      return `{${[...v.map.keys()]
        .sort(codePointCompare)
        .map((key) => `${pyString(key)}:${dumpCanonical(v.map.get(key))}`)
        .join(',')}}`;
    case 'array':
      return `[${v.items.map(dumpCanonical).join(',')}]`;
    case 'string':
      return pyString(v.value);
    case 'literal':
      return v.value;
    default:
      return v.integer ? BigInt(v.lexeme).toString() : pyFloatRepr(Number(v.lexeme));
  }
}

/** Parse JSON text; return {value kind, canonical: whether it is exactly its canonical form}. */
function canonicalCheck(text) {
  const parsed = parseLoose(text);
  return { kind: parsed.kind, canonical: dumpCanonical(parsed) === text };
}

module.exports = {
  EVENT_MODEL,
  EVENT_RUNTIME,
  ROLE_CHAT,
  ROLE_EMBEDDINGS,
  MODEL_ROLES,
  modelEvent,
  parseModelEvent,
  loggedModels,
  measuredBytes,
  eventDigest,
  extend,
  replay,
  parse,
  recordLine,
  canonicalCheck,
  JsonSyntaxError,
  pyFloatRepr,
};
