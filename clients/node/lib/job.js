'use strict';
// Confidential batch jobs, the owner's side of opening answers (docs/PROTOCOL.md, "Jobs";
// protocol/job.py): a signed manifest's digest, and the check that an answers file holds
// this job's answers in record order, none missing, then its end line.

const { encode, sha256 } = require('./encoding');
const errors = require('./errors');

const MANIFEST_LABEL = 'encloud/v1 job manifest';
const MANIFEST_KEYS = [
  'expires_at',
  'input_sha256',
  'job_id',
  'key_id',
  'model_digest',
  'output',
  'params',
  'records',
  'version',
];

/** RFC 8785 canonical JSON of plain JSON data: ECMAScript number and string serialisation
 * (what JSON.stringify does) with object keys sorted by UTF-16 code units. */
function canonicalJson(value) {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    const keys = Object.keys(value).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(value[k])}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

/** The manifest inside a signed manifest (bytes), and its digest
 * SHA-256(E("encloud/v1 job manifest", canonical(manifest))). The signature is Sentinel's to
 * check; this checks the shape and that the file is canonical. */
function parseManifest(data) {
  let obj;
  try {
    obj = JSON.parse(Buffer.from(data).toString('utf8'));
  } catch {
    throw new errors.ReleaseOrderFormatError('a job manifest is not JSON');
  }
  const manifest = obj && obj.manifest;
  const keys = manifest && typeof manifest === 'object' ? Object.keys(manifest).sort() : [];
  if (
    !obj ||
    typeof obj !== 'object' ||
    Object.keys(obj).sort().join() !== 'manifest,signature' ||
    keys.join() !== MANIFEST_KEYS.join() ||
    manifest.version !== 1
  ) {
    throw new errors.ReleaseOrderFormatError('not a signed job manifest (version 1)');
  }
  if (canonicalJson(obj) !== Buffer.from(data).toString('utf8')) {
    throw new errors.ReleaseOrderFormatError('a signed job manifest must be canonical JSON');
  }
  const digest = sha256(encode(MANIFEST_LABEL, Buffer.from(canonicalJson(manifest), 'utf8')));
  return { manifest, digest };
}

/** Feeds an answers file's plaintext as it is written; AnswersFileError for a line out of
 * place; finish() returns the number of answers once the end line closed the file.
 * `expectedJob` (a Buffer: the manifest digest) pins the job; else the first line's. */
class AnswersChecker {
  constructor(expectedJob) {
    this.job = expectedJob ? Buffer.from(expectedJob).toString('hex') : null;
    this.answers = 0;
    this.ended = false;
    this.partial = Buffer.alloc(0);
  }

  feed(chunk) {
    let data = Buffer.concat([this.partial, Buffer.from(chunk)]);
    let nl = data.indexOf(0x0a);
    while (nl >= 0) {
      this.line(data.subarray(0, nl));
      data = data.subarray(nl + 1);
      nl = data.indexOf(0x0a);
    }
    this.partial = Buffer.from(data);
  }

  finish() {
    if (this.partial.length) throw new errors.AnswersFileError('the answers file ends inside a line');
    if (!this.ended) {
      throw new errors.AnswersFileError(
        `the answers file ends after ${this.answers} answers without its end line`,
      );
    }
    return this.answers;
  }

  line(raw) {
    const where = `line ${this.answers + 1}`;
    if (this.ended) throw new errors.AnswersFileError(`${where} follows the end line`);
    let obj;
    try {
      obj = JSON.parse(raw.toString('utf8'));
    } catch {
      throw new errors.AnswersFileError(`${where} is not JSON`);
    }
    if (!obj || typeof obj !== 'object' || typeof obj.job !== 'string') {
      throw new errors.AnswersFileError(`${where} is not an answer of a job`);
    }
    if (this.job === null) this.job = obj.job;
    if (obj.job !== this.job) throw new errors.AnswersFileError(`${where} belongs to another job`);
    const keys = Object.keys(obj).sort().join();
    if (keys === 'end,job') {
      const end = obj.end;
      if (!end || typeof end !== 'object' || end.records !== this.answers) {
        throw new errors.AnswersFileError(
          `the end line counts ${JSON.stringify(end)} records, the file holds ${this.answers}`,
        );
      }
      this.ended = true;
      return;
    }
    if (keys !== 'answer,index,job' || !obj.answer || typeof obj.answer !== 'object') {
      throw new errors.AnswersFileError(`${where} is not an answer of a job`);
    }
    if (obj.index !== this.answers) {
      throw new errors.AnswersFileError(
        `${where} holds the answer to record ${JSON.stringify(obj.index)}, expected ${this.answers}`,
      );
    }
    this.answers += 1;
  }
}

module.exports = { MANIFEST_LABEL, canonicalJson, parseManifest, AnswersChecker };
