'use strict';
// The typed errors of the encloud protocol v2, named as in protocol/errors.py so a
// test vector's expected error class names the same failure in every language.

class EncloudError extends Error {
  constructor(message) {
    super(message);
    this.name = this.constructor.name;
  }
}

class VerificationError extends EncloudError {
  constructor(detail) {
    super(`${new.target.check}: ${detail}`);
    this.detail = detail;
    this.check = new.target.check;
  }
}
VerificationError.check = 'verification';

const errors = { EncloudError, VerificationError };

const checks = {
  MalformedEvidenceError: 'parse',
  AkUntrustedError: 'ak_trust',
  AkAttributesError: 'ak_attributes',
  SignatureError: 'signature',
  AttestMagicError: 'magic',
  AttestTypeError: 'attest_type',
  QualifiedSignerError: 'qualified_signer',
  NonceMismatchError: 'qualifying_data',
  PcrSelectionError: 'pcr_selection',
  PcrDigestError: 'pcr_digest',
  PcrValueError: 'pcr_value',
  EventLogFormatError: 'event_log_format',
  EventDigestError: 'event_digest',
  EventLogReplayError: 'event_log_replay',
  EventSequenceError: 'event_sequence',
  ModelNotAllowedError: 'model_digest',
  RuntimeNotAllowedError: 'runtime_event',
  SessionTtlError: 'session_ttl',
};
for (const [name, check] of Object.entries(checks)) {
  const cls = { [name]: class extends VerificationError {} }[name];
  cls.check = check;
  errors[name] = cls;
}
/** The Attest reply's session values are not what the protocol allows. */
class MalformedAttestResponseError extends errors.MalformedEvidenceError {}
MalformedAttestResponseError.check = 'attest_response';
errors.MalformedAttestResponseError = MalformedAttestResponseError;

function sub(name, parent) {
  errors[name] = { [name]: class extends parent {} }[name];
  return errors[name];
}

const PolicyError = sub('PolicyError', EncloudError);

/** A policy that parses but leaves out what it must state; `gaps` lists every item. */
class PolicyIncompleteError extends PolicyError {
  constructor(gaps) {
    super(`policy: the policy is incomplete: ${gaps.join('; ')}`);
    this.gaps = [...gaps];
    this.check = 'policy';
  }
}
errors.PolicyIncompleteError = PolicyIncompleteError;
/** A policy using a rule this client does not implement: refused, never skipped. */
sub('UnsupportedPolicyError', PolicyError);
sub('KeyOpenError', EncloudError);
sub('KeyConfirmationError', EncloudError);
const EnvelopeError = sub('EnvelopeError', EncloudError);
for (const name of [
  'DecryptError',
  'HeaderMismatchError',
  'StreamOrderError',
  'TruncatedStreamError',
  'TranscriptMismatchError',
  'EmbeddingFormatError', // an opened Embed response has not the shape its request asked for
  'KeyExhaustedError',
]) {
  sub(name, EnvelopeError);
}
/** A sealed file that does not open: its header, its key or one of its segments. */
const SealedFileError = sub('SealedFileError', EncloudError);
/** Not a sealed file of a version this client reads (magic, version, header lengths). */
sub('SealedFileFormatError', SealedFileError);
/** The file names another key id than the one the caller opens it with. */
sub('SealedFileKeyIdError', SealedFileError);
/** A segment failed authentication: tampered, reordered, dropped, truncated or spliced. */
sub('SealedFileDecryptError', SealedFileError);
/** A job's answers file out of order, of another job, cut, or with lines after its end. */
sub('AnswersFileError', EncloudError);
/** A job manifest that is not canonical JSON of the manifest's shape. */
sub('ReleaseOrderFormatError', EncloudError);
const SessionError = sub('SessionError', EncloudError);
sub('SessionExpiredError', SessionError);
/** The attested server measured no model of the role a call needs: nothing was sent. */
sub('RoleNotAttestedError', SessionError);

class ServiceError extends EncloudError {
  constructor(code, message, reason = '') {
    super(`${code}: ${message}`);
    this.code = code;
    this.reason = reason;
  }
}
errors.ServiceError = ServiceError;

module.exports = errors;
