'use strict';
// The client's stream rules (docs/PROTOCOL.md 5): contiguous seqs, a valid final frame with
// the client's own T_n, nothing after it; no final frame is a truncated stream.
const E = require('./errors');
const { MessageType, transcriptNext } = require('./envelope');
const { decodePayload, FinishReason } = require('./proto');
const { equal } = require('./encoding');

function checkFinal(final, expectedTranscript) {
  if (!equal(Buffer.from(final.transcript_hash || []), expectedTranscript)) {
    throw new E.TranscriptMismatchError('the final frame does not match what was received');
  }
  const reason = FinishReason[final.finish_reason];
  if (!reason) throw new E.StreamOrderError('the final frame has no valid finish reason');
  const usage = final.usage || {};
  return {
    finishReason: reason,
    promptTokens: usage.prompt_tokens || 0,
    completionTokens: usage.completion_tokens || 0,
  };
}

class StreamReader {
  constructor(opener, requestId, transcript) {
    this.opener = opener;
    this.requestId = requestId;
    this.transcript = transcript;
    this.seq = 0;
    this.completion = null;
  }

  /** One sealed message of the stream: returns {text} for a frame, {completion} for the final. */
  async feed(message) {
    if (this.completion) throw new E.StreamOrderError('a frame arrived after the final frame');
    if (message.type === MessageType.FRAME) {
      const payload = await this.opener.open(message, MessageType.FRAME, this.requestId, this.seq);
      this.transcript = transcriptNext(this.transcript, this.seq, payload);
      this.seq += 1;
      return { text: decodePayload('GenerationChunk', payload).text };
    }
    if (message.type === MessageType.FINAL) {
      const payload = await this.opener.open(message, MessageType.FINAL, this.requestId, this.seq);
      this.completion = checkFinal(decodePayload('GenerationFinal', payload), this.transcript);
      return { completion: this.completion };
    }
    throw new E.StreamOrderError('unexpected message type in a stream');
  }

  /** The stream ended: its completion, or TruncatedStreamError. */
  finish() {
    if (!this.completion) throw new E.TruncatedStreamError('the stream ended without its final frame');
    return this.completion;
  }
}

module.exports = { StreamReader, checkFinal };
