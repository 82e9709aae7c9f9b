#!/usr/bin/env node
'use strict';
// Runs the Node.js client against a real server.
//
//   node bin/encloud-node.js --target HOST:PORT --policy POLICY.json [--prompt TEXT]
//        [--max-new-tokens N] [--attacks]
//   node bin/encloud-node.js embed --target HOST:PORT --policy POLICY.json
//        [--dimensions N] [--no-normalize] [--truncate] [--array] [--] [TEXT ...]
//
// Without a subcommand it prints one JSON object. Without --attacks: attest (with the
// verifier's report), release a fresh key, Infer, StreamInfer, EndSession. With --attacks:
// the wrong-nonce and stream-tampering attacks, each through the client's test-only hooks
// (an on-path party's view), each expected to fail with its typed error; the output names
// the error each attack got.
//
// embed: attest, release a fresh key, Embed the texts (the arguments; without any, one per
// non-blank line of stdin), EndSession. stdout gets one JSON line per text in order,
// {"index": i, "embedding": [float, ...]} (as `encloud embed` prints), or with --array one
// JSON array of the vectors; the attestation summary and a closing line go to stderr.
// A failure prints {"ok": false, "error", "check", "message"} on stdout and exits 1.
//
//   node bin/encloud-node.js open IN -o OUT --key KEYFILE [--key-id K] [--manifest M]
//
// open: opens the sealed file IN (protocol/sealed_file.py's format) with the 32-byte key in
// KEYFILE (32 raw bytes or 64 hex digits), streaming, into a temporary file beside OUT that is
// renamed to OUT only once the whole file opened: a failed open leaves no OUT. --key-id K
// refuses a file sealed under another key id; --manifest M (a job's signed manifest) refuses
// a job's answers file unless every answer is that job's, in record order, none missing.
// It prints `opened IN (key id K, N bytes) -> OUT` on stderr and exits 0; a failure is one line on stderr (`encloud-node open: Error: detail`)
// and exit 1, a usage mistake one line and exit 2.
const fs = require('node:fs');
const path = require('node:path');
const crypto = require('node:crypto');
const { Writable } = require('node:stream');
const {
  EncloudClient,
  policy: pol,
  openSealedFile,
  readKeyFile,
  errors,
  job: jobLib,
} = require('../lib');

function args(argv) {
  const out = { prompt: 'Name three colours of the rainbow.', maxNewTokens: 16, attacks: false };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--target') out.target = argv[++i];
    else if (a === '--policy') out.policy = argv[++i];
    else if (a === '--prompt') out.prompt = argv[++i];
    else if (a === '--max-new-tokens') out.maxNewTokens = Number(argv[++i]);
    else if (a === '--attacks') out.attacks = true;
    else throw new Error(`unknown argument ${a}`);
  }
  if (!out.target || !out.policy) throw new Error('--target and --policy are required');
  return out;
}

function positiveInt(text, name) {
  if (!/^[1-9][0-9]*$/.test(text || '') || Number(text) > 0xffffffff) {
    throw new Error(`${name} must be a positive integer`);
  }
  return Number(text);
}

function embedArgs(argv) {
  const out = { texts: [], dimensions: undefined, normalize: true, truncate: false, array: false };
  let i = 3;
  for (; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--') {
      i++;
      break;
    }
    if (a === '--target') out.target = argv[++i];
    else if (a === '--policy') out.policy = argv[++i];
    else if (a === '--dimensions') out.dimensions = positiveInt(argv[++i], '--dimensions');
    else if (a === '--no-normalize') out.normalize = false;
    else if (a === '--truncate') out.truncate = true;
    else if (a === '--array') out.array = true;
    else if (a.startsWith('--')) throw new Error(`unknown argument ${a}`);
    else out.texts.push(a);
  }
  out.texts.push(...argv.slice(i));
  if (!out.target || !out.policy) throw new Error('--target and --policy are required');
  return out;
}

class UsageError extends Error {}

function openArgs(argv) {
  const out = {
    input: undefined,
    output: undefined,
    key: undefined,
    keyId: undefined,
    manifest: undefined,
  };
  const positional = [];
  let i = 3;
  for (; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--') {
      i++;
      break;
    }
    if (a === '-o' || a === '--output') out.output = value();
    else if (a === '--key') out.key = value();
    else if (a === '--key-id') out.keyId = value();
    else if (a === '--manifest') out.manifest = value();
    else if (a.startsWith('-') && a !== '-') throw new UsageError(`unknown argument ${a}`);
    else positional.push(a);
  }
  positional.push(...argv.slice(i));
  if (positional.length !== 1) throw new UsageError('give one sealed file to open (open IN -o OUT --key KEYFILE)');
  [out.input] = positional;
  if (!out.output || !out.key) throw new UsageError('-o OUT and --key KEYFILE are required');
  return out;
}

/** A writable that checks a job's answers as they pass to `inner` (lib/job.js), and ends
 * `inner` only once the whole file checked. */
class CheckedAnswers extends Writable {
  constructor(inner, checker, records) {
    super();
    this.inner = inner;
    this.checker = checker;
    this.records = records;
  }

  _write(chunk, _encoding, callback) {
    try {
      this.checker.feed(chunk);
    } catch (err) {
      callback(err);
      return;
    }
    if (this.inner.write(chunk)) callback();
    else this.inner.once('drain', () => callback());
  }

  _final(callback) {
    try {
      const count = this.checker.finish();
      if (count !== this.records) {
        throw new errors.AnswersFileError(
          `the answers file holds ${count} answers, the manifest ${this.records}`,
        );
      }
    } catch (err) {
      callback(err);
      return;
    }
    this.inner.once('error', callback);
    this.inner.end(() => callback());
  }
}

async function openFile(opt) {
  const key = readKeyFile(fs.readFileSync(opt.key));
  const job = opt.manifest ? jobLib.parseManifest(fs.readFileSync(opt.manifest)) : null;
  const target = path.resolve(opt.output);
  const tmp = path.join(
    path.dirname(target),
    `.${path.basename(target)}.${crypto.randomBytes(6).toString('hex')}.tmp`,
  );
  const fd = fs.openSync(tmp, 'wx', 0o600);
  const discard = () => {
    try {
      fs.unlinkSync(tmp);
    } catch {
      // already gone
    }
  };
  const interrupted = () => {
    discard();
    process.exit(130);
  };
  process.once('SIGINT', interrupted);
  process.once('SIGTERM', interrupted);
  const input = fs.createReadStream(opt.input);
  // autoClose: false: the descriptor stays open after 'finish', for fsync before the rename.
  const file = fs.createWriteStream(null, { fd, autoClose: false });
  const output = job
    ? new CheckedAnswers(file, new jobLib.AnswersChecker(job.digest), job.manifest.records)
    : file;
  let fdOpen = true;
  try {
    const expectedKeyId = job ? job.manifest.key_id : opt.keyId;
    const result = await openSealedFile(input, output, key, { expectedKeyId });
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fdOpen = false;
    fs.renameSync(tmp, target);
    process.stderr.write(`opened ${opt.input} (key id ${result.keyId}, ${result.bytes} bytes) -> ${opt.output}\n`);
  } catch (err) {
    input.destroy();
    if (output !== file) output.destroy();
    if (fdOpen && !file.closed) {
      // destroy() waits for a write in flight, then closes the descriptor
      await new Promise((resolve) => {
        file.once('close', resolve);
        file.once('error', () => {});
        file.destroy();
      });
    }
    discard();
    throw err;
  } finally {
    process.removeListener('SIGINT', interrupted);
    process.removeListener('SIGTERM', interrupted);
  }
}

async function openCommand(argv) {
  let opt;
  try {
    opt = openArgs(argv);
  } catch (err) {
    process.stderr.write(`encloud-node open: ${err.message}\n`);
    return 2;
  }
  try {
    await openFile(opt);
    return 0;
  } catch (err) {
    const name = err instanceof Error && err.name !== 'Error' ? `${err.name}: ` : '';
    const message = String(err && err.message ? err.message : err).replace(/\s*\n\s*/g, ' ');
    process.stderr.write(`encloud-node open: ${name}${message}\n`);
    return 1;
  }
}

async function collect(stream) {
  const pieces = [];
  for await (const piece of stream) pieces.push(piece);
  return pieces;
}

async function outcome(fn) {
  try {
    await fn();
    return { error: null };
  } catch (err) {
    return { error: err.name, check: err.check || null, message: err.message };
  }
}

async function endToEnd(opt, policy) {
  const client = new EncloudClient(opt.target, policy);
  try {
    const attestation = await client.attest();
    const suiteKemId = client.session.suite.kemId;
    const report = client.lastReport.map((r) => `${r.passed ? 'PASS' : 'FAIL'} ${r.name}`);
    await client.releaseKey();
    const params = { max_new_tokens: opt.maxNewTokens };
    const answer = await client.infer([['user', opt.prompt]], params);
    const stream = client.stream([['user', opt.prompt]], params);
    const pieces = await collect(stream);
    const sessionId = client.session.sessionId;
    const route = client.session.route;
    await client.endSession();
    // The ended session is gone on the server: a fresh client naming it is refused.
    return {
      ok: true,
      ak_fingerprint: attestation.akFingerprint,
      suite_kem_id: suiteKemId,
      model_digest: attestation.modelDigest.toString('hex'),
      models: Object.fromEntries(Object.entries(attestation.models).map(([r, d]) => [r, d.toString('hex')])),
      attest_digest: attestation.attestDigest.toString('hex'),
      report,
      infer: { text: answer.text, ...answer.completion },
      stream: { pieces, text: pieces.join(''), ...stream.completion },
      session_id: sessionId.toString('hex'),
      route,
    };
  } finally {
    client.close();
  }
}

async function attacks(opt, policy) {
  const results = {};
  const params = { max_new_tokens: opt.maxNewTokens };
  const ask = [['user', 'Count from one to five.']];

  // Wrong nonce: the quote on the wire is for another nonce than the client drew.
  const swapped = new EncloudClient(opt.target, policy, {
    hooks: { attestNonce: () => crypto.randomBytes(32) },
  });
  results.wrong_nonce = await outcome(() => swapped.attest());
  swapped.close();

  // Replayed quote: the reply to an earlier Attest answers a later one.
  let first = null;
  const replay = new EncloudClient(opt.target, policy, {
    hooks: { attestReply: (reply) => (first ? first : (first = reply)) },
  });
  await replay.attest();
  results.replayed_quote = await outcome(() => replay.attest());
  replay.close();

  // A malformed reply: a session id far too long to encode into Q.
  const oversized = new EncloudClient(opt.target, policy, {
    hooks: { attestReply: (reply) => ({ ...reply, session_id: Buffer.alloc(70000, 1) }) },
  });
  results.malformed_reply = await outcome(() => oversized.attest());
  oversized.close();

  // Stream tampering, in one session with a released key.
  let tamper = null;
  const client = new EncloudClient(opt.target, policy, {
    hooks: { streamMessage: (m, i) => (tamper ? tamper(m, i) : m) },
  });
  await client.attest();
  await client.releaseKey();
  let earlier = [];
  tamper = (m) => {
    earlier.push(m);
    return m;
  };
  const baseline = client.stream(ask, params);
  const pieces = await collect(baseline);
  results.baseline = { error: null, frames: earlier.length, text: pieces.join('') };
  const oldFrames = earlier;
  earlier = [];

  const cases = {
    drop_final: (m) => (m.type === 4 ? null : m),
    drop_frame: (m, i) => (i === 1 ? null : m),
    swap_frames: (() => {
      let held = null;
      return (m, i) => {
        if (i === 0) {
          held = m;
          return null;
        }
        if (i === 1) return [m, held];
        return m;
      };
    })(),
    flip_bit: (m, i) => {
      if (i !== 0) return m;
      const sealed = Buffer.from(m.sealed);
      sealed[sealed.length - 1] ^= 1;
      return { ...m, sealed };
    },
    replay_frame_relabelled: (m, i) => (i === 0 ? { ...oldFrames[0], requestId: m.requestId } : m),
    replay_frame_own_header: (m, i) => (i === 0 ? oldFrames[0] : m),
    frame_after_final: (m) => (m.type === 4 ? [m, oldFrames[0]] : m),
    final_forged: (m) => (m.type === 4 ? { ...m, sealed: oldFrames[oldFrames.length - 1].sealed } : m),
  };
  for (const [name, fn] of Object.entries(cases)) {
    tamper = fn;
    const stream = client.stream(ask, params);
    results[`stream_${name}`] = await outcome(async () => {
      await collect(stream);
      if (!stream.completion) throw new Error('no completion');
    });
  }
  tamper = null;
  const after = client.stream(ask, params);
  results.after_attacks = await outcome(() => collect(after));
  await client.endSession();
  client.close();
  return { ok: true, attacks: results };
}

async function embed(opt, policy) {
  const texts = opt.texts.length
    ? opt.texts
    : fs
        .readFileSync(0, 'utf8')
        .split('\n')
        .map((line) => line.replace(/\r$/, ''))
        .filter((line) => line.trim());
  if (!texts.length) throw new Error('no texts (give them as arguments or one per line on stdin)');
  const client = new EncloudClient(opt.target, policy);
  try {
    const attestation = await client.attest();
    const models = Object.entries(attestation.models).map(([r, d]) => `${r} ${d.toString('hex')}`);
    process.stderr.write(
      `attested: AK ${attestation.akFingerprint}; models: ${models.join(', ')}; ` +
        `${client.lastReport.length} checks passed\n`,
    );
    await client.releaseKey();
    const result = await client.embed(texts, {
      dimensions: opt.dimensions,
      normalize: opt.normalize,
      truncate: opt.truncate,
    });
    await client.endSession();
    if (opt.array) process.stdout.write(`${JSON.stringify(result.vectors)}\n`);
    else {
      result.vectors.forEach((vector, index) => {
        process.stdout.write(`${JSON.stringify({ index, embedding: vector })}\n`);
      });
    }
    process.stderr.write(
      `[${result.vectors.length} vectors of ${result.dimensions} dimensions; ` +
        `${result.promptTokens} tokens; response bound to the request]\n`,
    );
  } finally {
    client.close();
  }
}

async function main() {
  if (process.argv[2] === 'open') {
    process.exitCode = await openCommand(process.argv);
    return;
  }
  if (process.argv[2] === 'embed') {
    const opt = embedArgs(process.argv);
    await embed(opt, pol.parsePolicy(fs.readFileSync(opt.policy)));
    return;
  }
  const opt = args(process.argv);
  const policy = pol.parsePolicy(fs.readFileSync(opt.policy));
  const result = opt.attacks ? await attacks(opt, policy) : await endToEnd(opt, policy);
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main().catch((err) => {
  process.stdout.write(
    `${JSON.stringify({ ok: false, error: err.name, check: err.check || null, message: err.message })}\n`,
  );
  process.exit(1);
});
