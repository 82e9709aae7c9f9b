'use strict';
// The Node.js client of encloud protocol v2: attest, verify, release the key, chat sealed.
// Nothing is sent before the attestation verified and the key confirmation proved that the
// attested session holds the key.
const crypto = require('node:crypto');
const { performance } = require('node:perf_hooks');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const E = require('./errors');

/** The routing token's metadata key (docs/PROTOCOL.md, "Routing"). */
const ROUTE_HEADER = 'encloud-route';

function routeMetadata(route) {
  const metadata = new grpc.Metadata();
  if (route) metadata.set(ROUTE_HEADER, route);
  return metadata;
}
const hs = require('./handshake');
const env = require('./envelope');
const { verify } = require('./verifier');
const { StreamReader, checkFinal } = require('./stream');
const { embeddingRequest, openEmbeddings, textList } = require('./embedding');
const { PROTO_ROOT, PROTO_FILE, encodePayload, decodePayload, Role, errorReason } = require('./proto');
const { equal } = require('./encoding');

const NONCE_LENGTH = 32;
const { MessageType } = env;

function loadService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    keepCase: true,
    longs: String,
    enums: Number,
    bytes: Buffer,
    defaults: true,
    oneofs: true,
    includeDirs: [PROTO_ROOT],
  });
  return grpc.loadPackageDefinition(definition).encloud.v2.InferenceService;
}

const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

function serviceError(err) {
  if (!err || typeof err.code !== 'number') return err;
  const details = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  const reason = details.length ? errorReason(details[0]) : '';
  return new E.ServiceError(STATUS_NAMES[err.code] || 'UNKNOWN', err.details || '', reason);
}

/** A SealedMessage as it arrives from gRPC, in the envelope's own shape. */
function fromWire(m) {
  return { type: m.type, requestId: BigInt(m.request_id), seq: m.seq, sealed: Buffer.from(m.sealed) };
}

function toWire(m) {
  return { type: m.type, request_id: m.requestId.toString(), seq: m.seq, sealed: m.sealed };
}

function evidenceFromWire(ev) {
  return {
    quoteAttest: Buffer.from(ev.quote_attest),
    quoteSignature: Buffer.from(ev.quote_signature),
    akPublic: Buffer.from(ev.ak_public),
    akCertificateChain: (ev.ak_certificate_chain || []).map((c) => Buffer.from(c)),
    pcrHashAlgorithm: ev.pcr_hash_algorithm,
    pcrValues: new Map(Object.entries(ev.pcr_values || {}).map(([k, v]) => [Number(k), Buffer.from(v)])),
    workloadEventLog: Buffer.from(ev.workload_event_log),
  };
}

function generationRequest(messages, params = {}) {
  const known = new Set(['max_new_tokens', 'temperature', 'top_p', 'top_k', 'seed', 'stop']);
  for (const key of Object.keys(params)) {
    if (!known.has(key)) throw new TypeError(`unknown generation parameter ${key}`);
  }
  const request = {
    messages: messages.map((m) => {
      const [role, content] = Array.isArray(m) ? m : [m.role, m.content];
      if (!Role[role]) throw new TypeError(`unknown role ${role}`);
      return { role: Role[role], content };
    }),
  };
  for (const key of ['max_new_tokens', 'temperature', 'top_p', 'top_k', 'seed']) {
    if (params[key] !== undefined && params[key] !== null) request[key] = params[key];
  }
  if (params.stop) request.stop = params.stop;
  return encodePayload('GenerationRequest', request);
}

class EncloudClient {
  /**
   * target: host:port. policy: a parsed policy (policy.parsePolicy).
   * options.hooks (tests only): attestNonce(nonce) -> the nonce put on the wire;
   * attestReply(reply) -> the reply the client verifies; streamMessage(message, index) ->
   * a message, null (dropped) or an array of messages, as if an on-path party changed them.
   */
  constructor(target, policy, options = {}) {
    const Service = loadService();
    this.target = target;
    this.policy = policy;
    this.timeoutMs = options.timeoutMs ?? 60000;
    this.hooks = options.hooks || {};
    this.stub = new Service(target, options.credentials || grpc.credentials.createInsecure());
    this.session = null;
    this.lastReport = null;
  }

  deadline() {
    return new Date(Date.now() + this.timeoutMs);
  }

  /** A unary call; `route` is the session's routing token (docs/PROTOCOL.md, "Routing"),
   * sent as `encloud-route` metadata. Resolves to the reply; `onHeaders` gets the reply's
   * initial metadata (the Attest reply carries the token there). */
  call(method, request, route = '', onHeaders = null) {
    return new Promise((resolve, reject) => {
      const call = this.stub[method](
        request,
        routeMetadata(route),
        { deadline: this.deadline() },
        (err, reply) => (err ? reject(serviceError(err)) : resolve(reply)),
      );
      if (onHeaders) call.on('metadata', onHeaders);
    });
  }

  /** Start a session and verify its evidence; throws a VerificationError naming the check.
   * The suite is the policy's first (the post-quantum hybrid by default); a server that
   * answers UNSUPPORTED_SUITE gets the next one the policy lists, never another. */
  async attest(nonce = crypto.randomBytes(NONCE_LENGTH)) {
    const names = this.policy.hpkeSuites || hs.DEFAULT_SUITES;
    for (let i = 0; i < names.length; i++) {
      try {
        return await this.attestWith(hs.SUITE_NAMES[names[i]], nonce);
      } catch (err) {
        if (err.reason !== 'UNSUPPORTED_SUITE' || i + 1 === names.length) throw err;
      }
    }
    throw new Error('a policy lists at least one suite');
  }

  async attestWith(suite, nonce) {
    this.session = null;
    const wireNonce = this.hooks.attestNonce ? this.hooks.attestNonce(nonce) : nonce;
    const clientSecret = crypto.randomBytes(hs.CLIENT_SECRET_LENGTH);
    const commitment = hs.clientCommitment(clientSecret);
    let route = '';
    let reply = await this.call(
      'Attest',
      {
        nonce: wireNonce,
        suite: { kem_id: suite.kemId, kdf_id: suite.kdfId, aead_id: suite.aeadId },
        client_commitment: commitment,
      },
      '',
      (headers) => {
        const value = headers.get(ROUTE_HEADER);
        route = value.length ? String(value[0]) : '';
      },
    );
    const receivedAt = performance.now();
    if (this.hooks.attestReply) reply = this.hooks.attestReply(reply);
    const sessionId = Buffer.from(reply.session_id);
    const sessionPub = Buffer.from(reply.session_public_key);
    const ttl = reply.ttl_seconds;
    // The session values are checked before Q is computed from them (docs/PROTOCOL.md §2).
    let malformed = null;
    if (sessionId.length !== hs.SESSION_ID_LENGTH) malformed = 'the session id is not 16 bytes';
    else if (sessionPub.length !== hs.publicKeyLength(suite))
      malformed = "the session public key is not the suite's length";
    else if (!Number.isInteger(ttl) || ttl <= 0 || ttl >= 2 ** 32)
      malformed = 'the session TTL is not 1 to 2^32-1 seconds';
    if (malformed) throw new E.MalformedAttestResponseError(malformed);
    const expected = hs.quoteQualifyingData(suite, nonce, commitment, sessionPub, sessionId, ttl);
    let attestation;
    try {
      attestation = await verify(evidenceFromWire(reply.evidence), this.policy, {
        expectedQualifyingData: expected,
        sessionTtlSeconds: ttl,
      });
    } catch (err) {
      this.lastReport = err.report || null;
      throw err;
    }
    this.lastReport = attestation.report;
    this.session = {
      sessionId,
      suite,
      nonce,
      clientSecret,
      sessionPub,
      ttl,
      route,
      expiresAt: receivedAt + ttl * 1000,
      attestation,
      c2s: null,
      s2c: null,
      nextRequestId: 1n,
    };
    return attestation;
  }

  liveSession() {
    if (!this.session) throw new E.SessionError('attest first');
    if (performance.now() >= this.session.expiresAt) {
      this.session = null;
      throw new E.SessionExpiredError('the session expired; attest again');
    }
    return this.session;
  }

  /** Seal the DEK (fresh by default) to the attested session; check the key confirmation. */
  async releaseKey(dek = crypto.randomBytes(32)) {
    const s = this.liveSession();
    if (s.c2s) throw new E.SessionError('the key was already released to this session');
    const secret = crypto.randomBytes(32);
    const hEv = s.attestation.attestDigest;
    const info = hs.releaseInfo(s.suite, s.sessionId, hEv);
    const sealedKey = await hs.sealKey(s.sessionPub, Buffer.from(dek), secret, s.clientSecret, info, s.suite);
    const enc = sealedKey.subarray(0, hs.encLength(s.suite));
    const hHs = hs.handshakeHash(s.suite, s.nonce, s.sessionPub, s.sessionId, s.ttl, hEv, enc);
    const keys = await hs.deriveTrafficKeys(Buffer.from(dek), secret, hHs);
    secret.fill(0);
    const reply = await this.call(
      'ReleaseKey',
      { session_id: s.sessionId, sealed_key: sealedKey },
      s.route,
    );
    await confirmKey(keys.kc, s.sessionId, reply.key_confirmation && fromWire(reply.key_confirmation), hHs);
    s.clientSecret.fill(0); // bound: the secret has done its one job
    s.c2s = new env.SealingKey(keys.c2s, s.sessionId);
    s.s2c = new env.OpeningKey(keys.s2c, s.sessionId);
    keys.c2s.fill(0);
    keys.s2c.fill(0);
    keys.kc.fill(0);
  }

  async sealRequest(messages, params) {
    return this.sealPayload(MessageType.REQUEST, () => generationRequest(messages, params));
  }

  /** Seal a request's payload (built and checked before a request id is taken) under the
   * next request id, seq 0, for a server whose verified start-up serves the request's role. */
  async sealPayload(type, build) {
    const s = this.liveSession();
    if (!s.c2s) throw new E.SessionError('release the key before sending requests');
    const role = type === MessageType.EMBED_REQUEST ? 'embeddings' : 'chat';
    const models = (s.attestation && s.attestation.models) || {};
    if (!(role in models)) {
      const served = Object.keys(models).join(', ') || 'none';
      throw new E.RoleNotAttestedError(
        `the attested server serves no ${role} model (its models: ${served}); nothing was sent`,
      );
    }
    const payload = build();
    const requestId = s.nextRequestId++;
    const sealed = await s.c2s.seal(type, requestId, 0, payload);
    return { s, requestId, sealed };
  }

  /** One sealed request, one sealed answer: {text, completion}. */
  async infer(messages, params = {}) {
    const { s, requestId, sealed } = await this.sealRequest(messages, params);
    const reply = await this.call(
      'Infer',
      { session_id: s.sessionId, request: toWire(sealed) },
      s.route,
    );
    const payload = await s.s2c.open(fromWire(reply.response), MessageType.RESPONSE, requestId, 0);
    const response = decodePayload('GenerationResponse', payload);
    const t0 = env.transcriptStart(s.sessionId, requestId, sealed.sealed);
    const completion = checkFinal(response.final || {}, t0);
    return { text: response.text, completion };
  }

  /**
   * One sealed batch of texts, one sealed batch of vectors (row i for texts[i]), bound to
   * the request by its transcript hash T_0. texts: an array (or iterable) of strings, at
   * least one (the server allows up to its embed_max_texts). dimensions: keep the first N
   * components (before normalisation; the response must have exactly N); normalize: unit
   * vectors (default true); truncate: cut a text above the server's per-text token limit
   * instead of refusing it (TEXT_TOO_LONG).
   * Resolves to {vectors: number[][], dimensions, promptTokens}: plain arrays of JS numbers
   * (each float32 widened exactly to a double). Throws TranscriptMismatchError,
   * EmbeddingFormatError, HeaderMismatchError or DecryptError for a response that is not
   * the answer to this request, ServiceError when the server refuses the call.
   */
  async embed(texts, { dimensions, normalize = true, truncate = false } = {}) {
    let list = null;
    const { s, requestId, sealed } = await this.sealPayload(MessageType.EMBED_REQUEST, () => {
      list = textList(texts); // an iterable is read once, here
      return embeddingRequest(list, { dimensions, normalize, truncate });
    });
    const reply = await this.call(
      'Embed',
      { session_id: s.sessionId, request: toWire(sealed) },
      s.route,
    );
    const t0 = env.transcriptStart(s.sessionId, requestId, sealed.sealed);
    // A reply without its sealed message reads as an empty one (type 0): HeaderMismatchError.
    const response = reply.response
      ? fromWire(reply.response)
      : { type: 0, requestId: 0n, seq: 0, sealed: Buffer.alloc(0) };
    return openEmbeddings(response, s.s2c, requestId, t0, list.length, dimensions ?? null);
  }

  /** A streamed answer: an async iterator of text pieces; `.completion` after the end. */
  stream(messages, params = {}) {
    const client = this;
    const result = {
      completion: null,
      async *[Symbol.asyncIterator]() {
        const { s, requestId, sealed } = await client.sealRequest(messages, params);
        const reader = new StreamReader(
          s.s2c,
          requestId,
          env.transcriptStart(s.sessionId, requestId, sealed.sealed),
        );
        const call = client.stub.StreamInfer(
          { session_id: s.sessionId, request: toWire(sealed) },
          routeMetadata(s.route),
          { deadline: client.deadline() },
        );
        let index = 0;
        try {
          for await (const response of call) {
            let messagesIn = [fromWire(response.frame || {})];
            if (client.hooks.streamMessage) {
              const changed = client.hooks.streamMessage(messagesIn[0], index);
              messagesIn = changed === null ? [] : Array.isArray(changed) ? changed : [changed];
            }
            index += 1;
            for (const message of messagesIn) {
              const out = await reader.feed(message);
              if (out.text) yield out.text; // an empty frame (a server's frame clock) shows nothing
            }
          }
        } catch (err) {
          call.cancel();
          throw serviceError(err);
        }
        result.completion = reader.finish();
      },
    };
    return result;
  }

  /** Seal an END so the server drops the session's keys; then drop ours. */
  async endSession() {
    const s = this.session;
    this.session = null;
    if (!s || !s.c2s) return;
    const requestId = s.nextRequestId++;
    const sealed = await s.c2s.seal(MessageType.END, requestId, 0, Buffer.alloc(0));
    await this.call('EndSession', { session_id: s.sessionId, end: toWire(sealed) }, s.route);
  }

  close() {
    this.session = null;
    this.stub.close();
  }
}

/** Open the key confirmation under k_kc and compare it with our own H_hs. */
async function confirmKey(kc, sessionId, message, hHs) {
  let proof;
  try {
    proof = await new env.OpeningKey(kc, sessionId).open(message || {}, MessageType.KEY_CONFIRM, 0n, 0);
  } catch (err) {
    throw new E.KeyConfirmationError(`the server did not prove it holds the key (${err.name})`);
  }
  if (!equal(proof, hHs)) throw new E.KeyConfirmationError('the key confirmation is for another handshake');
}

module.exports = {
  EncloudClient,
  confirmKey,
  generationRequest,
  embeddingRequest,
  openEmbeddings,
  fromWire,
  toWire,
  evidenceFromWire,
};
