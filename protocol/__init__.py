"""encloud's wire protocol and its verifier: every byte both ends agree on.

The canonical encoding, the sealed envelope, the handshake, the evidence and its
TPM structures, the workload event log, the verification policy, the verifier
with its hardware-report checks, the audit log and offline evidence bundles,
and the generated protobuf stubs (v1). Pure: it imports nothing else of
encloud's, so the client, the server and any future service (a key broker, an
HTTP proxy) share exactly one reading of the protocol. docs/ARCHITECTURE.md.
"""
