'use strict';
// The wire contract, loaded from the same proto/encloud/v2/encloud.proto the server uses.
const path = require('node:path');
const protobuf = require('protobufjs');

const PROTO_ROOT = process.env.ENCLOUD_PROTO_ROOT || path.resolve(__dirname, '..', '..', '..', 'proto');
const PROTO_FILE = path.join(PROTO_ROOT, 'encloud', 'v2', 'encloud.proto');

const root = new protobuf.Root();
root.loadSync(PROTO_FILE, { keepCase: true });
const types = Object.fromEntries(
  [
    'GenerationRequest',
    'GenerationChunk',
    'GenerationFinal',
    'GenerationResponse',
    'ChatMessage',
    'EmbeddingRequest',
    'EmbeddingResponse',
  ].map(
    (name) => [name, root.lookupType(`encloud.v2.${name}`)],
  ),
);

const Role = { system: 1, user: 2, assistant: 3 };
const FinishReason = { 1: 'stop', 2: 'length', 3: 'cancelled', 4: 'key_exhausted' };

function encodePayload(typeName, obj) {
  const type = types[typeName];
  const err = type.verify(obj);
  if (err) throw new TypeError(`${typeName}: ${err}`);
  return Buffer.from(type.encode(type.fromObject(obj)).finish());
}

function decodePayload(typeName, bytes) {
  const type = types[typeName];
  return type.toObject(type.decode(bytes), { longs: String, bytes: Buffer, defaults: true });
}

// google.rpc.Status and ErrorInfo, for the grpc-status-details-bin trailer.
const rpc = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: { nested: { Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } } } },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
          },
        },
      },
    },
  },
});

function errorReason(statusDetails) {
  try {
    const status = rpc.lookupType('google.rpc.Status').decode(statusDetails);
    for (const detail of status.details) {
      if (detail.type_url.endsWith('/google.rpc.ErrorInfo')) {
        return rpc.lookupType('google.rpc.ErrorInfo').decode(detail.value).reason;
      }
    }
  } catch {
    // a malformed trailer leaves the reason empty
  }
  return '';
}

module.exports = { PROTO_ROOT, PROTO_FILE, encodePayload, decodePayload, Role, FinishReason, errorReason };
