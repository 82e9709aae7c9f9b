'use strict';
// Embedding requests and answers inside the envelope, without I/O (protocol/embedding.py).
//
// embeddingRequest builds the sealed request's payload; embeddingResponse the server's (for
// tests); openEmbeddings checks an Embed response: opened as EMBED_RESPONSE for this request,
// bound to the sealed request by its transcript hash T_0 (the Infer rule), one vector per text
// sent, the dimension asked for, and padding rows that are zeros.
//
// Vectors travel as little-endian IEEE-754 float32, row-major, padded with zero rows to the
// request's bucket (1, 8, 32, then the server's embed_max_texts), so the sealed size shows
// the bucket and the dimension, not the number of texts. They are returned as arrays of
// JS numbers (each float32 widened exactly to a double), row i for text i.
const E = require('./errors');
const { MessageType } = require('./envelope');
const { encodePayload, decodePayload } = require('./proto');
const { equal } = require('./encoding');

const ROW_BUCKETS = [1, 8, 32];
const FLOAT32 = 4;
const MAX_U32 = 0xffffffff;

/** The bucket a response of `count` vectors is padded to: 1, 8, 32, then maxTexts. */
function paddedRows(count, maxTexts) {
  if (!Number.isInteger(count) || count < 1 || count > Math.max(maxTexts, 1)) {
    throw new RangeError(`${count} texts is outside 1..${maxTexts}`);
  }
  for (const bucket of ROW_BUCKETS) {
    if (count <= bucket && bucket <= maxTexts) return bucket;
  }
  return maxTexts;
}

/** The texts of a request as an array, checked: TypeError for a string or a non-string
 * item, RangeError for an empty batch. */
function textList(texts) {
  if (typeof texts === 'string') throw new TypeError('texts must be a list of strings, not one string');
  if (texts === null || texts === undefined || typeof texts[Symbol.iterator] !== 'function') {
    throw new TypeError('texts must be a list of strings');
  }
  const list = Array.from(texts);
  if (!list.length) throw new RangeError('at least one text is needed');
  if (list.some((text) => typeof text !== 'string')) throw new TypeError('every text must be a string');
  return list;
}

/** undefined/null (the model's full dimension) or an integer in 1..2^32-1. */
function checkDimensions(dimensions) {
  if (dimensions === undefined || dimensions === null) return null;
  if (!Number.isInteger(dimensions) || dimensions < 1 || dimensions > MAX_U32) {
    throw new RangeError('dimensions must be a positive integer');
  }
  return dimensions;
}

/**
 * The plaintext of an EMBED_REQUEST (an EmbeddingRequest), byte for byte what
 * protocol/embedding.py embedding_request writes: fields at their default value are left
 * out (dimensions 0, unnormalized false, truncate false).
 */
function embeddingRequest(texts, { dimensions, normalize = true, truncate = false } = {}) {
  const request = { texts: textList(texts) };
  const dims = checkDimensions(dimensions);
  if (dims !== null) request.dimensions = dims;
  if (!normalize) request.unnormalized = true;
  if (truncate) request.truncate = true;
  return encodePayload('EmbeddingRequest', request);
}

/** The plaintext of an EMBED_RESPONSE: `vectors` holds count x dimensions float32 LE; the
 * zero rows up to `rows` are added here. */
function embeddingResponse(vectors, count, dimensions, rows, promptTokens, transcript) {
  vectors = Buffer.from(vectors);
  if (vectors.length !== count * dimensions * FLOAT32 || !(count <= rows)) {
    throw new RangeError('the vectors do not have count x dimensions components');
  }
  const padding = Buffer.alloc((rows - count) * dimensions * FLOAT32);
  return encodePayload('EmbeddingResponse', {
    count,
    dimensions,
    rows,
    vectors: Buffer.concat([vectors, padding]),
    prompt_tokens: promptTokens,
    transcript_hash: Buffer.from(transcript),
  });
}

/**
 * Open and check an Embed response for `count` texts (and `dimensions`, when the request
 * named one; null/undefined when it did not).
 * message: {type, requestId, seq, sealed}; opener: the session's s2c OpeningKey;
 * transcript: T_0 of the sealed request.
 * Returns {vectors: number[][], dimensions, promptTokens}. Throws HeaderMismatchError or
 * DecryptError (the envelope), TranscriptMismatchError (another request's answer), or
 * EmbeddingFormatError (the shape is not the one asked for).
 */
async function openEmbeddings(message, opener, requestId, transcript, count, dimensions) {
  const payload = await opener.open(message, MessageType.EMBED_RESPONSE, requestId, 0);
  let answer;
  try {
    answer = decodePayload('EmbeddingResponse', payload);
  } catch {
    throw new E.EmbeddingFormatError('the response is not an EmbeddingResponse');
  }
  if (!equal(Buffer.from(answer.transcript_hash || []), transcript)) {
    throw new E.TranscriptMismatchError('the response does not answer the request that was sent');
  }
  if (answer.count !== count) throw new E.EmbeddingFormatError(`${answer.count} vectors for ${count} texts`);
  if (dimensions !== undefined && dimensions !== null && answer.dimensions !== dimensions) {
    throw new E.EmbeddingFormatError(`${answer.dimensions} dimensions, ${dimensions} asked for`);
  }
  const width = answer.dimensions;
  if (width < 1 || answer.rows < count) throw new E.EmbeddingFormatError('the response has no vectors');
  const block = Buffer.from(answer.vectors);
  // rows and dimensions are u32: their product is exact below 2^53 and, above it, far
  // beyond any buffer's length, so the comparison is exact where it matters.
  if (block.length !== answer.rows * width * FLOAT32) {
    throw new E.EmbeddingFormatError('the vector block is not rows x dimensions float32');
  }
  const used = count * width * FLOAT32;
  if (block.subarray(used).some((byte) => byte !== 0)) {
    throw new E.EmbeddingFormatError('a padding row is not zeros');
  }
  const vectors = [];
  for (let i = 0; i < count; i++) {
    const row = new Array(width);
    for (let j = 0; j < width; j++) row[j] = block.readFloatLE((i * width + j) * FLOAT32);
    vectors.push(row);
  }
  return { vectors, dimensions: width, promptTokens: answer.prompt_tokens };
}

module.exports = {
  ROW_BUCKETS,
  FLOAT32,
  paddedRows,
  textList,
  embeddingRequest,
  embeddingResponse,
  openEmbeddings,
};
