'use strict';
// Every shared test vector (tests/vectors/*.json), positive and negative, against this client.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const crypto = require('node:crypto');
const lib = require('../lib');

const { encoding, handshake: hs, envelope: env, eventlog, policy: pol, verifier, errors: E } = lib;
const DIR = process.env.ENCLOUD_VECTORS || path.resolve(__dirname, '..', '..', '..', 'tests', 'vectors');
const load = (name) => JSON.parse(fs.readFileSync(path.join(DIR, `${name}.json`), 'utf8'));
const b = (hex) => Buffer.from(hex, 'hex');
const sealed = (m) => ({ type: m.type, requestId: BigInt(m.request_id), seq: m.seq, sealed: b(m.sealed) });

async function rejectsWith(promiseOrFn, name) {
  let error = null;
  try {
    await (typeof promiseOrFn === 'function' ? promiseOrFn() : promiseOrFn);
  } catch (err) {
    error = err;
  }
  assert.ok(error, `expected ${name}, nothing was thrown`);
  assert.equal(error.name, name, `expected ${name}, got ${error.name}: ${error.message}`);
  assert.ok(E[name] && error instanceof E[name]);
}

test('encoding', () => {
  const v = load('encoding');
  assert.equal(hs.suiteBytes(hs.SUITE_V1).toString('hex'), v.suite_v1);
  for (const c of v.integers) assert.equal(encoding[c.name](c.name === 'u64' ? BigInt(c.value) : c.value).toString('hex'), c.bytes);
  const field = (f) => (typeof f === 'string' ? b(f) : Buffer.alloc(f.zeros));
  for (const c of v.cases) {
    const encoded = encoding.encode(c.label, ...c.fields.map(field));
    assert.equal(encoding.sha256(encoded).toString('hex'), c.sha256);
    if (c.encoded) assert.equal(encoded.toString('hex'), c.encoded);
  }
  for (const c of v.errors) assert.throws(() => encoding.encode(c.label, ...c.fields.map(field)), RangeError);
});

test('handshake: Q, HPKE open side, H_hs, traffic keys, key confirmation', async () => {
  const v = load('handshake');
  const [nonce, pub, sid] = [b(v.nonce), b(v.session_public_key), b(v.session_id)];
  const commitment = hs.clientCommitment(b(v.client_secret));
  assert.equal(commitment.toString('hex'), v.client_commitment);
  assert.equal(encoding.sha256(b(v.client_commitment_encoded)).toString('hex'), v.client_commitment);
  const q = hs.quoteQualifyingData(hs.SUITE_V1, nonce, commitment, pub, sid, v.ttl_seconds);
  assert.equal(q.toString('hex'), v.qualifying_data);
  assert.equal(encoding.sha256(b(v.quote_encoded)).toString('hex'), v.qualifying_data);
  const hEv = encoding.sha256(b(v.quote_attest));
  assert.equal(hEv.toString('hex'), v.attest_digest);
  const info = hs.releaseInfo(hs.SUITE_V1, sid, hEv);
  assert.equal(info.toString('hex'), v.release_info);
  const opened = await hs.openKey(b(v.session_private_key), b(v.sealed_key), info);
  assert.equal(opened.dek.toString('hex'), v.dek);
  assert.equal(opened.sessionSecret.toString('hex'), v.session_secret);
  assert.ok(hs.opensCommitment(commitment, opened.clientSecret));
  assert.equal(b(v.sealed_key).subarray(0, 32).toString('hex'), v.enc);
  const hHs = hs.handshakeHash(hs.SUITE_V1, nonce, pub, sid, v.ttl_seconds, hEv, b(v.enc));
  assert.equal(hHs.toString('hex'), v.handshake_hash);
  assert.equal(encoding.sha256(b(v.handshake_encoded)).toString('hex'), v.handshake_hash);
  assert.equal(crypto.createHmac('sha256', hHs).update(Buffer.concat([b(v.dek), b(v.session_secret)])).digest('hex'), v.prk);
  const keys = await hs.deriveTrafficKeys(b(v.dek), b(v.session_secret), hHs);
  assert.equal(keys.c2s.toString('hex'), v.k_c2s);
  assert.equal(keys.s2c.toString('hex'), v.k_s2c);
  assert.equal(keys.kc.toString('hex'), v.k_kc);
  await lib.confirmKey(b(v.k_kc), sid, sealed(v.key_confirmation), hHs);
  // What this client seals, the reference recipient key opens (round trip through @hpke/core).
  const mine = await hs.sealKey(pub, b(v.dek), b(v.session_secret), b(v.client_secret), info);
  const back = await hs.openKey(b(v.session_private_key), mine, info);
  assert.equal(back.dek.toString('hex'), v.dek);
  assert.equal(back.clientSecret.toString('hex'), v.client_secret);
  for (const c of v.commitment_negative) {
    // Opens as HPKE, but its client secret does not open the commitment: refused.
    const foreign = await hs.openKey(b(c.recipient_private_key), b(c.sealed_key), b(c.info));
    assert.equal(c.error, 'KeyReleaseRefused');
    assert.ok(!hs.opensCommitment(b(c.client_commitment), foreign.clientSecret));
  }
  for (const c of v.hpke_negative) {
    await rejectsWith(hs.openKey(b(c.recipient_private_key), b(c.sealed_key), b(c.info)), c.error);
  }
  for (const c of v.key_confirmation_negative) {
    await rejectsWith(lib.confirmKey(b(v.k_kc), sid, sealed(c.key_confirmation), hHs), c.error);
  }
});

test('envelope: associated data, padding, sealed messages', async () => {
  const v = load('envelope');
  const sid = b(v.session_id);
  for (const [name, bucket] of Object.entries(v.pad_buckets)) assert.equal(env.PAD_BUCKETS[env.MessageType[name]], bucket);
  for (const c of v.associated_data) {
    assert.equal(env.associatedData(c.type, sid, BigInt(c.request_id), c.seq).toString('hex'), c.associated_data);
  }
  for (const c of v.padding) {
    assert.equal(env.pad(b(c.payload), c.bucket).toString('hex'), c.padded);
    assert.equal(env.unpad(b(c.padded), c.bucket).toString('hex'), c.payload);
  }
  for (const c of v.unpad_negative) await rejectsWith(() => env.unpad(b(c.padded), c.bucket), c.error);
  for (const c of v.sealed) {
    const type = env.MessageType[c.name];
    assert.equal(env.associatedData(type, sid, c.request_id, c.seq).toString('hex'), c.associated_data);
    const opener = new env.OpeningKey(b(v.keys[c.key]), sid);
    const payload = await opener.open(sealed(c), type, c.request_id, c.seq);
    assert.equal(payload.toString('hex'), c.payload);
    // Sealing with the vector's nonce gives the vector's bytes.
    const sealer = new env.SealingKey(b(v.keys[c.key]), sid, { nonceSource: () => b(c.nonce) });
    const again = await sealer.seal(type, BigInt(c.request_id), c.seq, b(c.payload));
    assert.equal(again.sealed.toString('hex'), c.sealed);
  }
  for (const c of v.negative) {
    const opener = new env.OpeningKey(b(v.keys[c.key]), sid);
    await rejectsWith(opener.open(sealed(c), c.expected.type, BigInt(c.expected.request_id), c.expected.seq), c.error);
  }
});

async function runStream(v, messages) {
  const reader = new lib.stream.StreamReader(new env.OpeningKey(b(v.keys.s2c), b(v.session_id)), BigInt(v.request_id), b(v.transcripts[0]));
  const pieces = [];
  for (const m of messages) {
    const out = await reader.feed(sealed(m));
    if (out.text !== undefined) pieces.push(out.text);
  }
  return { pieces, completion: reader.finish() };
}

test('stream: transcript T_0..T_n and the stream rules', async (t) => {
  const v = load('stream');
  const sid = b(v.session_id);
  const request = sealed(v.request);
  let transcript = env.transcriptStart(sid, BigInt(v.request_id), request.sealed);
  assert.equal(encoding.sha256(b(v.transcript_encoded)).toString('hex'), v.transcripts[0]);
  const chain = [transcript];
  v.frame_payloads.forEach((p, s) => chain.push((transcript = env.transcriptNext(transcript, s, b(p)))));
  assert.deepEqual(chain.map((x) => x.toString('hex')), v.transcripts);
  const req = await new env.OpeningKey(b(v.keys.c2s), sid).open(request, env.MessageType.REQUEST, v.request_id, 0);
  assert.equal(req.toString('hex'), v.request_payload);
  for (const c of v.cases) {
    await t.test(c.name, async () => {
      if (c.error) return rejectsWith(runStream(v, c.messages), c.error);
      const { pieces, completion } = await runStream(v, c.messages);
      assert.deepEqual(pieces, c.expect.pieces);
      assert.equal(completion.finishReason, c.expect.finish_reason);
      assert.equal(completion.promptTokens, c.expect.prompt_tokens);
      assert.equal(completion.completionTokens, c.expect.completion_tokens);
    });
  }
  const infer = v.infer;
  const t0 = env.transcriptStart(sid, BigInt(infer.request_id), b(infer.request.sealed));
  assert.equal(t0.toString('hex'), infer.transcript);
  const payload = await new env.OpeningKey(b(v.keys.s2c), sid).open(sealed(infer.response), env.MessageType.RESPONSE, 1n, 0);
  assert.equal(payload.toString('hex'), infer.response_payload);
  const response = lib.proto.decodePayload('GenerationResponse', payload);
  const completion = lib.stream.checkFinal(response.final, t0);
  assert.equal(response.text, infer.expect.text);
  assert.equal(completion.finishReason, infer.expect.finish_reason);
});

// --- Embed ----------------------------------------------------------------------------------

const { embedding: emb } = lib;

test('embed: the sealed request, T_0 and the row buckets', async () => {
  const v = load('embed');
  const sid = b(v.session_id);
  const request = sealed(v.request);
  assert.equal(env.transcriptStart(sid, BigInt(v.request_id), request.sealed).toString('hex'), v.transcript);
  const opener = new env.OpeningKey(b(v.keys.c2s), sid);
  const payload = await opener.open(request, env.MessageType.EMBED_REQUEST, BigInt(v.request_id), 0);
  assert.equal(payload.toString('hex'), v.request_payload);
  assert.equal(emb.embeddingRequest(v.texts, { dimensions: v.dimensions }).toString('hex'), v.request_payload);
  const parsed = lib.proto.decodePayload('EmbeddingRequest', payload);
  assert.deepEqual(parsed.texts, v.texts);
  assert.equal(parsed.unnormalized, false);
  assert.equal(parsed.truncate, false);
  for (const [count, rows] of Object.entries(v.row_buckets)) assert.equal(emb.paddedRows(Number(count), v.max_texts), rows, count);
  // Sealing the payload with the vector's nonce gives the vector's bytes.
  const sealer = new env.SealingKey(b(v.keys.c2s), sid, { nonceSource: () => request.sealed.subarray(0, env.NONCE_LENGTH) });
  const again = await sealer.seal(env.MessageType.EMBED_REQUEST, BigInt(v.request_id), 0, payload);
  assert.equal(again.sealed.toString('hex'), v.request.sealed);
  // Options other than the defaults are sent; the defaults are left out, as Python does.
  const other = lib.proto.decodePayload('EmbeddingRequest', emb.embeddingRequest(['x'], { normalize: false, truncate: true }));
  assert.deepEqual([other.dimensions, other.unnormalized, other.truncate], [0, true, true]);
  assert.equal(emb.embeddingRequest(['x'], { dimensions: null }).toString('hex'), emb.embeddingRequest(['x']).toString('hex'));
  assert.throws(() => emb.embeddingRequest('one string'), TypeError);
  assert.throws(() => emb.embeddingRequest([]), RangeError);
  assert.throws(() => emb.embeddingRequest(['a', 1]), TypeError);
  for (const dimensions of [0, -1, 1.5, 2 ** 32]) assert.throws(() => emb.embeddingRequest(['a'], { dimensions }), RangeError);
  for (const count of [0, 65]) assert.throws(() => emb.paddedRows(count, v.max_texts), RangeError);
});

function openEmbed(v, message) {
  const opener = new env.OpeningKey(b(v.keys.s2c), b(v.session_id));
  return emb.openEmbeddings(sealed(message), opener, BigInt(v.request_id), b(v.transcript), v.texts.length, v.dimensions);
}

test('embed: responses opened, or refused with their typed error', async (t) => {
  const v = load('embed');
  for (const c of v.cases) {
    await t.test(c.name, async () => {
      if (c.error) return rejectsWith(openEmbed(v, c.response), c.error);
      const result = await openEmbed(v, c.response);
      assert.deepEqual(result.vectors, v.expect.vectors);
      assert.equal(result.dimensions, v.expect.dimensions);
      assert.equal(result.promptTokens, v.expect.prompt_tokens);
    });
  }
  // The valid response's payload is what this client's own encoder writes from its values.
  const valid = v.cases.find((c) => !c.error);
  const payload = await new env.OpeningKey(b(v.keys.s2c), b(v.session_id)).open(sealed(valid.response), env.MessageType.EMBED_RESPONSE, BigInt(v.request_id), 0);
  assert.equal(payload.toString('hex'), v.response_payload);
  const floats = Buffer.alloc(v.texts.length * v.dimensions * 4);
  v.expect.vectors.flat().forEach((x, i) => floats.writeFloatLE(x, i * 4));
  const mine = emb.embeddingResponse(floats, v.texts.length, v.dimensions, v.expect.rows, v.expect.prompt_tokens, b(v.transcript));
  assert.equal(mine.toString('hex'), v.response_payload);
});

test('embed: every count in one bucket seals to the same size', () => {
  const byBucket = new Map();
  for (let count = 1; count <= 64; count++) {
    const rows = emb.paddedRows(count, 64);
    const payload = emb.embeddingResponse(Buffer.alloc(count * 384 * 4), count, 384, rows, 7 + count * 300, Buffer.alloc(32));
    const size = env.pad(payload, env.PAD_BUCKETS[env.MessageType.EMBED_RESPONSE]).length;
    if (!byBucket.has(rows)) byBucket.set(rows, new Set());
    byBucket.get(rows).add(size);
  }
  assert.deepEqual([...byBucket.keys()], [1, 8, 32, 64]);
  for (const sizes of byBucket.values()) assert.equal(sizes.size, 1);
});

/** A server that answers Embed only, over a real gRPC channel: it opens the sealed request
 * and answers with what `answer(payload, t0, requestId)` returns (an EmbeddingResponse
 * payload), sealed under the vector session's s2c key. */
async function fakeEmbedServer(v, answer) {
  const grpc = require('@grpc/grpc-js');
  const protoLoader = require('@grpc/proto-loader');
  const definition = protoLoader.loadSync(lib.proto.PROTO_FILE, {
    keepCase: true, longs: String, enums: Number, bytes: Buffer, defaults: true, oneofs: true, includeDirs: [lib.proto.PROTO_ROOT],
  });
  const service = grpc.loadPackageDefinition(definition).encloud.v2.InferenceService.service;
  const sid = b(v.session_id);
  const seen = [];
  const server = new grpc.Server();
  server.addService(service, {
    Embed: async (call, callback) => {
      try {
        const request = lib.fromWire(call.request.request);
        seen.push({ sessionId: Buffer.from(call.request.session_id), request });
        const payload = await new env.OpeningKey(b(v.keys.c2s), sid).open(request, env.MessageType.EMBED_REQUEST, request.requestId, 0);
        const t0 = env.transcriptStart(sid, request.requestId, request.sealed);
        const reply = await new env.SealingKey(b(v.keys.s2c), sid).seal(env.MessageType.EMBED_RESPONSE, request.requestId, 0, answer(payload, t0, request.requestId));
        callback(null, { response: lib.toWire(reply) });
      } catch (err) {
        callback({ code: grpc.status.INTERNAL, details: err.message });
      }
    },
  });
  const port = await new Promise((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  return { server, seen, target: `127.0.0.1:${port}` };
}

/** A client holding the embed vector's session (as after attest and releaseKey). */
function clientWithSession(v, target, models = { embeddings: Buffer.alloc(32) }) {
  const client = new lib.EncloudClient(target, null);
  const sid = b(v.session_id);
  client.session = {
    sessionId: sid,
    route: '',
    expiresAt: Infinity,
    attestation: { models },
    c2s: new env.SealingKey(b(v.keys.c2s), sid),
    s2c: new env.OpeningKey(b(v.keys.s2c), sid),
    nextRequestId: BigInt(v.request_id),
  };
  return client;
}

test('embed: EncloudClient.embed over gRPC, answered or refused', async () => {
  const v = load('embed');
  const floats = (n, d) => {
    const out = Buffer.alloc(n * d * 4);
    for (let i = 0; i < n * d; i++) out.writeFloatLE((i % 7) / 8 - 0.25, i * 4);
    return out;
  };
  let mode = 'ok';
  const { server, seen, target } = await fakeEmbedServer(v, (payload, t0) => {
    const request = lib.proto.decodePayload('EmbeddingRequest', payload);
    const n = request.texts.length;
    const d = request.dimensions || 6;
    const rows = emb.paddedRows(n, 64);
    if (mode === 'other_transcript') return emb.embeddingResponse(floats(n, d), n, d, rows, 5, Buffer.alloc(32));
    if (mode === 'fewer') return emb.embeddingResponse(floats(n - 1, d), n - 1, d, rows, 5, t0);
    return emb.embeddingResponse(floats(n, d), n, d, rows, 5 * n, t0);
  });
  const client = clientWithSession(v, target);
  try {
    const result = await client.embed(v.texts, { dimensions: v.dimensions });
    assert.equal(result.dimensions, v.dimensions);
    assert.equal(result.promptTokens, 15);
    assert.equal(result.vectors.length, v.texts.length);
    assert.deepEqual(result.vectors[0], [-0.25, -0.125, 0, 0.125]);
    // The request went out as the vector's own bytes' kind: EMBED_REQUEST, seq 0, a fresh id.
    assert.equal(seen[0].request.type, env.MessageType.EMBED_REQUEST);
    assert.equal(seen[0].request.requestId, BigInt(v.request_id));
    assert.equal(seen[0].sessionId.toString('hex'), v.session_id);
    const full = await client.embed(new Set(['a', 'b']), { normalize: false, truncate: true });
    assert.equal(full.dimensions, 6);
    assert.equal(seen[1].request.requestId, BigInt(v.request_id) + 1n);
    mode = 'other_transcript';
    await rejectsWith(client.embed(['a']), 'TranscriptMismatchError');
    mode = 'fewer';
    await rejectsWith(client.embed(['a', 'b']), 'EmbeddingFormatError');
    mode = 'ok';
    const cut = await client.embed(['a'], { dimensions: 3 });
    assert.deepEqual(cut.vectors, [[-0.25, -0.125, 0]]);
    const ids = client.session.nextRequestId;
    await assert.rejects(client.embed('one string'), TypeError);
    await assert.rejects(client.embed([]), RangeError);
    await assert.rejects(client.embed({}), TypeError);
    await assert.rejects(client.embed(['a'], { dimensions: 0 }), RangeError);
    // A malformed batch is refused before anything is sent or a request id is taken.
    assert.equal(seen.length, 5);
    assert.equal(client.session.nextRequestId, ids);
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test('embed: no session, or no released key, sends nothing', async () => {
  const v = load('embed');
  const client = clientWithSession(v, '127.0.0.1:9');
  try {
    client.session.c2s = null;
    await rejectsWith(client.embed(['a']), 'SessionError');
    client.session = null;
    await rejectsWith(client.embed(['a']), 'SessionError');
  } finally {
    client.close();
  }
});

test('embed and infer: a role the attestation does not show sends nothing', async () => {
  const v = load('embed');
  const chatOnly = clientWithSession(v, '127.0.0.1:9', { chat: Buffer.alloc(32) });
  const embeddingsOnly = clientWithSession(v, '127.0.0.1:9');
  try {
    await rejectsWith(chatOnly.embed(['a']), 'RoleNotAttestedError');
    await rejectsWith(embeddingsOnly.infer([{ role: 'user', content: 'hi' }]), 'RoleNotAttestedError');
    assert.equal(chatOnly.session.nextRequestId, BigInt(v.request_id)); // no request id taken
  } finally {
    chatOnly.close();
    embeddingsOnly.close();
  }
});

// --- event log and model digest -----------------------------------------------------------------

test('event log: start-ups of model events (chat, embeddings) then one runtime event', async (t) => {
  const v = load('eventlog');
  for (const c of v.sequences) {
    await t.test(c.name, () => {
      const records = eventlog.parse(Buffer.from(c.log, 'ascii'));
      if (c.error) return rejectsWith(() => verifier.checkSequence(records), c.error);
      const startups = verifier.checkSequence(records);
      const got = startups.map(({ models }) => Object.fromEntries(Object.entries(models).map(([r, d]) => [r, d.toString('hex')])));
      assert.deepEqual(got, c.startups);
    });
  }
  // What the chat/embeddings events of the log are, as the reference writes them.
  const digest = Buffer.alloc(32, 0xab);
  const event = eventlog.modelEvent('embeddings', digest);
  assert.equal(event.data.toString('ascii'), `{"digest":"${digest.toString('hex')}","role":"embeddings"}`);
  assert.deepEqual(eventlog.parseModelEvent(event.data), { role: 'embeddings', digest });
  assert.throws(() => eventlog.modelEvent('other', digest), RangeError);
  const records = eventlog.parse(Buffer.from(v.sequences.find((c) => c.name === 'restart_adds_embeddings').log, 'ascii'));
  const models = eventlog.loggedModels(records);
  assert.deepEqual(Object.keys(models), ['chat', 'embeddings']);
  assert.equal(models.chat.length, 1);
});

test('event log, replay, model digest, canonical JSON', () => {
  const v = load('eventlog');
  const records = eventlog.parse(Buffer.from(v.log, 'ascii'));
  let pcr = Buffer.alloc(32);
  v.events.forEach((step, i) => {
    assert.equal(eventlog.measuredBytes(step.event_type, b(step.data)).toString('hex'), step.measured);
    assert.equal(eventlog.eventDigest(step.event_type, b(step.data)).toString('hex'), step.digest);
    assert.equal(records[i].digest.toString('hex'), step.digest);
    pcr = eventlog.extend(pcr, records[i].digest);
    assert.equal(pcr.toString('hex'), step.pcr_after);
    assert.equal(eventlog.recordLine(i, records[i].pcr, records[i].digest, records[i].eventType, records[i].data), step.line);
  });
  assert.equal(eventlog.replay(records).toString('hex'), pcr.toString('hex'));
  const md = v.model_digest;
  const paths = Object.keys(md.files).sort((x, y) => Buffer.compare(Buffer.from(x, 'utf8'), Buffer.from(y, 'utf8')));
  assert.deepEqual(paths, md.sorted_paths);
  const fields = paths.map((p) => {
    const digest = encoding.sha256(Buffer.from(md.files[p], 'base64'));
    assert.equal(digest.toString('hex'), md.file_sha256[p]);
    return Buffer.concat([Buffer.from(p, 'utf8'), Buffer.from([0]), digest]);
  });
  fields.push(encoding.sha256(Buffer.from(md.chat_template, 'utf8')));
  const encoded = encoding.encode('encloud/v1 model', ...fields);
  assert.equal(encoded.toString('hex'), md.encoded);
  assert.equal(encoding.sha256(encoded).toString('hex'), md.model_digest);
  for (const c of v.canonical_json) assert.equal(eventlog.canonicalCheck(c.json).canonical, c.canonical, c.json);
});

function evidence(obj) {
  return {
    quoteAttest: b(obj.quote_attest),
    quoteSignature: b(obj.quote_signature),
    akPublic: b(obj.ak_public),
    akCertificateChain: obj.ak_certificate_chain.map(b),
    pcrHashAlgorithm: obj.pcr_hash_algorithm,
    pcrValues: new Map(Object.entries(obj.pcr_values).map(([k, x]) => [Number(k), b(x)])),
    workloadEventLog: b(obj.workload_event_log),
  };
}

function verifyCase(v, c) {
  const cl = c.client;
  const q = hs.quoteQualifyingData(hs.SUITE_V1, b(cl.nonce), b(cl.client_commitment), b(cl.session_public_key), b(cl.session_id), cl.ttl_seconds);
  return verifier.verify(evidence(c.evidence), pol.parsePolicy(v.policies[c.policy]), {
    expectedQualifyingData: q,
    sessionTtlSeconds: cl.ttl_seconds,
  });
}

test('evidence: the valid quote verifies', async () => {
  const v = load('evidence');
  for (const c of v.positive) {
    const got = await verifyCase(v, c);
    assert.equal(got.attestDigest.toString('hex'), c.expect.attest_digest);
    assert.equal(got.akFingerprint, c.expect.ak_fingerprint);
    assert.equal(got.akSpki.toString('hex'), c.expect.ak_spki);
    assert.equal(got.modelDigest.toString('hex'), c.expect.model_digest);
    assert.equal(got.models.chat.toString('hex'), c.expect.model_digest);
    assert.equal(got.runtimeEvent.toString('hex'), c.expect.runtime_event);
    assert.equal(got.workloadPcrValue.toString('hex'), c.expect.workload_pcr_value);
    assert.ok(got.report.every((r) => r.passed) && got.report.length === 21);
  }
});

test('evidence: every attack is refused with its typed error', async (t) => {
  const v = load('evidence');
  for (const c of v.negative) {
    await t.test(c.name, () => rejectsWith(verifyCase(v, c), c.error));
  }
});

test('policy: completeness rules, the same gap lines as the reference', async (t) => {
  const v = load('policy');
  for (const c of v.policies) {
    await t.test(c.name, () => {
      let error = null;
      let parsed = null;
      try {
        parsed = pol.parsePolicy(c.policy);
      } catch (err) {
        error = err;
      }
      const hasPlatform = 'platform' in JSON.parse(c.policy);
      if (c.expect === 'complete' && !hasPlatform) {
        assert.equal(error, null, error && error.message);
        assert.ok(pol.isParsed(parsed));
      } else if (c.expect === 'complete') {
        // No hardware-report verification here: refused, never passed.
        assert.ok(error instanceof E.UnsupportedPolicyError, error && error.message);
      } else if (c.expect === 'incomplete') {
        assert.ok(error instanceof E.PolicyIncompleteError, error && error.message);
        assert.deepEqual(error.gaps, c.gaps);
      } else {
        assert.ok(error instanceof E.PolicyError && !(error instanceof E.PolicyIncompleteError), error && error.message);
        assert.ok(error.message.includes(`policy field '${c.field}'`), error.message);
      }
    });
  }
});

test('policy: the GCE identity of an AK certificate against ak.gce', async (t) => {
  const v = load('policy');
  for (const c of v.gce_identity) {
    await t.test(c.name, () => {
      const pin = c.pin === null ? null : pol.parseGce(c.pin);
      if (c.expect === 'ok') lib.gce.checkGceIdentity(b(c.leaf), pin);
      else assert.throws(() => lib.gce.checkGceIdentity(b(c.leaf), pin), (err) => err.name === c.expect);
    });
  }
});

test('verifier: a policy object not made by parsePolicy is refused', async () => {
  const v = load('evidence');
  const c = v.positive[0];
  const hand = { ...pol.parsePolicy(v.policies[c.policy]) };
  const cl = c.client;
  const q = hs.quoteQualifyingData(hs.SUITE_V1, b(cl.nonce), b(cl.client_commitment), b(cl.session_public_key), b(cl.session_id), cl.ttl_seconds);
  await rejectsWith(verifier.verify(evidence(c.evidence), hand, { expectedQualifyingData: q, sessionTtlSeconds: cl.ttl_seconds }), 'PolicyIncompleteError');
});

test('policy: AK certificate chains, validated as the reference does or refused', async (t) => {
  const v = load('policy');
  for (const c of v.chains) {
    await t.test(c.name, () => {
      const chain = c.chain.map(b);
      const root = new crypto.X509Certificate(c.root);
      const run = () => verifier.checkCertificateChain(chain, [root], b(c.ak_spki), c.gce_pinned);
      if (c.expect === 'ok') run();
      else assert.throws(run, (err) => err.name === c.expect);
    });
  }
});

test('handshake: the X-Wing suite, seals of both sides opened', async () => {
  const h = load('handshake');
  const v = h.xwing;
  assert.equal(hs.suiteBytes(hs.SUITE_XWING).toString('hex'), v.suite.encoded);
  const pub = b(v.session_public_key);
  assert.equal(pub.length, 1216);
  const q = hs.quoteQualifyingData(hs.SUITE_XWING, b(h.nonce), b(h.client_commitment), pub, b(h.session_id), h.ttl_seconds);
  assert.equal(q.toString('hex'), v.qualifying_data);
  for (const who of ['sealed_by_python', 'sealed_by_node']) {
    const opened = await hs.openKey(b(v.session_private_seed), b(v[who]), b(v.release_info), hs.SUITE_XWING);
    assert.equal(Buffer.concat([opened.dek, opened.sessionSecret, opened.clientSecret]).toString('hex'), v.sealed_plaintext, who);
  }
  // What this client seals now opens too (round trip through @hpke/hybridkem-x-wing).
  const plain = b(v.sealed_plaintext);
  const mine = await hs.sealKey(pub, plain.subarray(0, 32), plain.subarray(32, 64), plain.subarray(64), b(v.release_info), hs.SUITE_XWING);
  assert.equal(mine.length, 1120 + 96 + 16);
  const back = await hs.openKey(b(v.session_private_seed), mine, b(v.release_info), hs.SUITE_XWING);
  assert.equal(back.clientSecret.toString('hex'), plain.subarray(64).toString('hex'));
});

test('policy: allowed_embedding_model_digests, and a model in either list', async (t) => {
  const v = load('evidence');
  const base = JSON.parse(v.policies.base);
  const chat = base.allowed_model_digests[0];
  const other = 'cd'.repeat(32);
  const parse = (changes) => pol.parsePolicy(JSON.stringify({ ...base, ...changes }));
  const refused = (changes, field) => {
    let error = null;
    try {
      parse(changes);
    } catch (err) {
      error = err;
    }
    assert.ok(error instanceof E.PolicyError, `expected PolicyError on ${field}`);
    assert.ok(error.message.includes(`policy field '${field}'`), error.message);
  };
  await t.test('embeddings only', () => {
    const p = parse({ allowed_model_digests: [], allowed_embedding_model_digests: [other] });
    assert.deepEqual(p.allowedModelDigests, []);
    assert.deepEqual(pol.allowedModels(p, 'embeddings').map((d) => d.toString('hex')), [other]);
  });
  await t.test('absent or empty: no embedding model', () => {
    assert.deepEqual(pol.allowedModels(parse({}), 'embeddings'), []);
    assert.deepEqual(pol.allowedModels(parse({ allowed_embedding_model_digests: [] }), 'embeddings'), []);
    assert.deepEqual(pol.allowedModels(parse({}), 'other'), []);
  });
  await t.test('no model at all', () => {
    refused({ allowed_model_digests: [] }, 'allowed_model_digests');
    refused({ allowed_model_digests: [], allowed_embedding_model_digests: [] }, 'allowed_model_digests');
  });
  await t.test('the same rules as allowed_model_digests', () => {
    refused({ allowed_embedding_model_digests: [other.toUpperCase()] }, 'allowed_embedding_model_digests[0]');
    refused({ allowed_embedding_model_digests: ['00'] }, 'allowed_embedding_model_digests[0]');
    refused({ allowed_embedding_model_digests: [other, other] }, 'allowed_embedding_model_digests');
    refused({ allowed_embedding_model_digests: other }, 'allowed_embedding_model_digests');
    refused({ allowed_model_digests: 'x' }, 'allowed_model_digests');
  });
  await t.test('a model is allowed for its own role only', async () => {
    const c = v.positive[0];
    const cl = c.client;
    const q = hs.quoteQualifyingData(hs.SUITE_V1, b(cl.nonce), b(cl.client_commitment), b(cl.session_public_key), b(cl.session_id), cl.ttl_seconds);
    const run = (policy) => verifier.verify(evidence(c.evidence), policy, { expectedQualifyingData: q, sessionTtlSeconds: cl.ttl_seconds });
    // The evidence's chat model, allowed only as an embedding model: refused.
    await rejectsWith(run(parse({ allowed_model_digests: [], allowed_embedding_model_digests: [chat] })), 'ModelNotAllowedError');
    const got = await run(parse({ allowed_embedding_model_digests: [other] }));
    assert.deepEqual(Object.keys(got.models), ['chat']);
    assert.equal(got.modelDigest.toString('hex'), chat);
  });
});

test('sealed files: every case of sealed_file.json', async (t) => {
  const v = load('sealed_file');
  const sf = lib.sealedFile;
  const key = b(v.key);
  assert.equal(v.segment_size, sf.SEGMENT_SIZE);
  // Fed as a stream in 7-byte chunks, so no case depends on how the input is cut up.
  const chunked = function* (data) {
    for (let i = 0; i < data.length; i += 7) yield data.subarray(i, i + 7);
  };
  const viaStream = async (data, opts) => {
    const parts = [];
    const sink = new (require('node:stream').Writable)({
      write(chunk, _enc, cb) {
        parts.push(chunk);
        cb();
      },
    });
    const result = await lib.openSealedFile(chunked(data), sink, key, opts);
    return { ...result, plaintext: Buffer.concat(parts) };
  };
  for (const c of v.positive) {
    await t.test(`positive: ${c.name}`, async () => {
      const header = sf.sealedHeader(c.key_id);
      assert.equal(header.toString('hex'), c.header);
      assert.equal(sf.fileKey(key, b(c.salt), header).toString('hex'), c.file_key);
      const data = b(c.sealed);
      assert.equal(data.subarray(header.length + 1, header.length + 33).toString('hex'), c.salt);
      assert.equal(data.subarray(header.length + 33, header.length + 40).toString('hex'), c.nonce_prefix);
      const opened = await lib.openSealedBuffer(data, key);
      assert.deepEqual(
        { keyId: opened.keyId, version: opened.version, plaintext: opened.plaintext.toString('hex') },
        { keyId: c.key_id, version: 1, plaintext: c.plaintext },
      );
      const streamed = await viaStream(data, { expectedKeyId: c.key_id });
      assert.equal(streamed.plaintext.toString('hex'), c.plaintext);
      assert.equal(streamed.bytes, c.plaintext.length / 2);
      assert.equal(streamed.keyId, c.key_id);
    });
  }
  for (const c of v.negative) {
    await t.test(`negative: ${c.name}`, async () => {
      await rejectsWith(lib.openSealedBuffer(b(c.sealed), key), c.error);
      await rejectsWith(viaStream(b(c.sealed)), c.error);
    });
  }
  await t.test('expected_key_id', async () => {
    const c = v.expected_key_id;
    await rejectsWith(lib.openSealedBuffer(b(c.sealed), key, { expectedKeyId: c.expected }), c.error);
    await rejectsWith(viaStream(b(c.sealed), { expectedKeyId: c.expected }), c.error);
    const right = await lib.openSealedBuffer(b(c.sealed), key, { expectedKeyId: v.positive[0].key_id });
    assert.equal(right.keyId, v.positive[0].key_id);
  });
});

test('jobs: the manifest digest and the answers files of jobs.json', () => {
  const v = load('jobs');
  const { job } = require('../lib');
  const { manifest, digest } = job.parseManifest(Buffer.from(v.manifest.signed, 'utf8'));
  assert.equal(digest.toString('hex'), v.manifest.digest);
  assert.equal(manifest.records, 3);
  const good = new job.AnswersChecker(digest);
  for (const line of v.answers.lines) good.feed(Buffer.from(line, 'utf8'));
  assert.equal(good.finish(), 3);
  for (const c of v.answers.refused) {
    const checker = new job.AnswersChecker(digest);
    assert.throws(
      () => {
        for (const line of c.lines) checker.feed(Buffer.from(line, 'utf8'));
        checker.finish();
      },
      (err) => err.name === 'AnswersFileError',
      c.name,
    );
  }
  for (const c of v.negative_manifests.filter((n) => n.error === 'ReleaseOrderFormatError')) {
    if (['output_a_path', 'unknown_param', 'no_records'].includes(c.name)) continue; // Sentinel's
    assert.throws(
      () => job.parseManifest(Buffer.from(c.signed, 'utf8')),
      (err) => err.name === 'ReleaseOrderFormatError',
      c.name,
    );
  }
});
