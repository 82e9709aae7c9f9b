'use strict';
module.exports = {
  ...require('./client'),
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
  proto: require('./proto'),
};
