'use strict';
const sealedFile = require('./sealed_file');

module.exports = {
  ...require('./client'),
  openSealedFile: sealedFile.openSealedFile,
  openSealedBuffer: sealedFile.openSealedBuffer,
  readKeyFile: sealedFile.readKeyFile,
  sealedFile,
  errors: require('./errors'),
  encoding: require('./encoding'),
  handshake: require('./handshake'),
  envelope: require('./envelope'),
  eventlog: require('./eventlog'),
  tpm: require('./tpm'),
  policy: require('./policy'),
  verifier: require('./verifier'),
  gce: require('./gce'),
  stream: require('./stream'),
  embedding: require('./embedding'),
  job: require('./job'),
  proto: require('./proto'),
};
