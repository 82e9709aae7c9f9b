"""Generate the protocol v2 test vectors in tests/vectors/*.json.

    .venv/bin/python tests/vectors/generate.py          # rewrite the JSON files
    .venv/bin/python tests/vectors/generate.py --check  # exit 1 if they differ

Every value is deterministic: keys are derived from fixed labels, AES-GCM nonces are
fixed (this script calls AESGCM directly instead of encloud.protocol.envelope, whose
SealingKey always draws a random nonce), ECDSA signatures are RFC 6979 deterministic,
and the HPKE vector uses a fixed ephemeral key (RFC 9180 base mode written out here
for the generator only; cryptography's HPKE opens it, which the generator asserts).

The constructions themselves come from the Python reference (encloud.client.*), so a
change that alters any byte on the wire changes a vector, and tests/test_vectors.py,
which compares this script's output with the committed files, fails.
The layout of the files is described in docs/PROTOCOL.md, "Test vectors".
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import struct
import sys
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encloud.protocol import eventlog, release_order, sealed_file
from encloud.protocol.embedding import embedding_request, embedding_response, padded_rows
from encloud.protocol.encoding import encode, sha256, u8, u16, u32, u64
from encloud.protocol.envelope import (
    PAD_BUCKETS,
    MessageType,
    associated_data,
    pad,
    transcript_next,
    transcript_start,
)
from encloud.protocol.handshake import (
    SUITE_V1,
    client_commitment,
    derive_traffic_keys,
    handshake_hash,
    quote_qualifying_data,
    release_info,
    sentinel_qualifying_data,
)
from encloud.protocol.policy import build_policy
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.server.inference.manifest import compute_model_digest

HERE = Path(__file__).resolve().parent
FILES = (
    "encoding",
    "handshake",
    "envelope",
    "stream",
    "embed",
    "sealed_file",
    "sentinel",
    "jobs",
    "eventlog",
    "evidence",
    "policy",
    "audit",
)


def seed(label: str, n: int = 32) -> bytes:
    """Fixed pseudo-random bytes named by a label (SHA-256 in counter mode)."""
    out = b""
    counter = 0
    while len(out) < n:
        out += sha256(b"encloud/v1 test vectors\x00" + label.encode() + u32(counter))
        counter += 1
    return out[:n]


def hx(data: bytes) -> str:
    return data.hex()


# --- HPKE base mode with a fixed ephemeral key (RFC 9180, generator only) -------------


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt or bytes(32), ikm, "sha256")


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _hkdf_extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, n: int) -> bytes:
    return _hkdf_expand(prk, u16(n) + b"HPKE-v1" + suite_id + label + info, n)


def hpke_seal_fixed(
    recipient_pub: bytes, ephemeral: x25519.X25519PrivateKey, info: bytes, plaintext: bytes
) -> tuple[bytes, bytes]:
    """DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 + AES-256-GCM, base mode, seq 0."""
    kem_id = b"KEM" + u16(0x0020)
    enc = ephemeral.public_key().public_bytes_raw()
    dh = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(recipient_pub))
    eae_prk = _labeled_extract(kem_id, b"", b"eae_prk", dh)
    shared = _labeled_expand(kem_id, eae_prk, b"shared_secret", enc + recipient_pub, 32)
    suite_id = b"HPKE" + SUITE_V1.encoded()
    psk_id_hash = _labeled_extract(suite_id, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(suite_id, b"", b"info_hash", info)
    context = b"\x00" + psk_id_hash + info_hash
    secret = _labeled_extract(suite_id, shared, b"secret", b"")
    key = _labeled_expand(suite_id, secret, b"key", context, 32)
    base_nonce = _labeled_expand(suite_id, secret, b"base_nonce", context, 12)
    return enc, AESGCM(key).encrypt(base_nonce, plaintext, b"")


# --- sealed messages with fixed nonces ------------------------------------------------


def seal_fixed(
    key: bytes,
    session_id: bytes,
    message_type: int,
    request_id: int,
    seq: int,
    payload: bytes,
    nonce: bytes,
    *,
    padded: bytes | None = None,
) -> bytes:
    """nonce || AES-256-GCM(pad(payload)) with the v2 associated data; padded overrides."""
    aad = associated_data(message_type, session_id, request_id, seq)
    plaintext = padded if padded is not None else pad(payload, PAD_BUCKETS[message_type])
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def sealed_json(message_type: int, request_id: int, seq: int, sealed: bytes) -> dict[str, Any]:
    return {"type": message_type, "request_id": request_id, "seq": seq, "sealed": hx(sealed)}


# --- TPM structures (TPM 2.0 Part 2), enough for one ECC AK and its quote -------------

SHA1, SHA256, SHA384 = 0x0004, 0x000B, 0x000C
NULL, ECC, AES, CFB, ECDSA, P256 = 0x0010, 0x0023, 0x0006, 0x0043, 0x0018, 0x0003
MAGIC, ST_QUOTE, ST_CERTIFY = 0xFF544347, 0x8018, 0x8017
RH_ENDORSEMENT = 0x4000000B
FIXED_TPM, FIXED_PARENT, SENSITIVE, USER_AUTH = 0x2, 0x10, 0x20, 0x40
RESTRICTED, DECRYPT, SIGN = 0x10000, 0x20000, 0x40000
AK_ATTRIBUTES = FIXED_TPM | FIXED_PARENT | SENSITIVE | USER_AUTH | RESTRICTED | SIGN


def tpm2b(data: bytes) -> bytes:
    return u16(len(data)) + data


def ec_key(label: str) -> ec.EllipticCurvePrivateKey:
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    return ec.derive_private_key(
        int.from_bytes(seed(label), "big") % (order - 1) + 1, ec.SECP256R1()
    )


def ecc_public(
    key: ec.EllipticCurvePrivateKey,
    *,
    attributes: int = AK_ATTRIBUTES,
    symmetric: bytes = u16(NULL),
    scheme_hash: int = SHA256,
) -> bytes:
    numbers = key.public_key().public_numbers()
    return (
        u16(ECC)
        + u16(SHA256)
        + u32(attributes)
        + tpm2b(b"")
        + symmetric
        + u16(ECDSA)
        + u16(scheme_hash)
        + u16(P256)
        + u16(NULL)
        + tpm2b(numbers.x.to_bytes(32, "big"))
        + tpm2b(numbers.y.to_bytes(32, "big"))
    )


def qualified_name(public: bytes, hierarchy: int = RH_ENDORSEMENT) -> bytes:
    name = u16(SHA256) + sha256(public)
    return u16(SHA256) + sha256(u32(hierarchy) + name)


def pcr_selection(banks: list[tuple[int, list[int]]]) -> bytes:
    out = u32(len(banks))
    for alg, indices in banks:
        bitmap = bytearray(3)
        for i in indices:
            bitmap[i // 8] |= 1 << (i % 8)
        out += u16(alg) + b"\x03" + bytes(bitmap)
    return out


def quote_attest(
    *,
    signer: bytes,
    extra: bytes,
    banks: list[tuple[int, list[int]]],
    digest: bytes,
    magic: int = MAGIC,
    attest_type: int = ST_QUOTE,
) -> bytes:
    return (
        u32(magic)
        + u16(attest_type)
        + tpm2b(signer)
        + tpm2b(extra)
        + u64(0x0000_0001_2345_6789)  # clock
        + u32(3)  # resetCount
        + u32(7)  # restartCount
        + b"\x01"  # safe
        + u64(0x2023_0123_0016_0000)  # firmwareVersion
        + pcr_selection(banks)
        + tpm2b(digest)
    )


def tpm_sign(key: ec.EllipticCurvePrivateKey, message: bytes, hash_alg: int = SHA256) -> bytes:
    algorithm = hashes.SHA256() if hash_alg == SHA256 else hashes.SHA384()
    der = key.sign(message, ec.ECDSA(algorithm, deterministic_signing=True))
    r, s = decode_dss_signature(der)
    return u16(ECDSA) + u16(hash_alg) + tpm2b(r.to_bytes(32, "big")) + tpm2b(s.to_bytes(32, "big"))


def spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- the one session all vectors share -----------------------------------------------

SESSION_KEY = x25519.X25519PrivateKey.from_private_bytes(seed("session private key"))
SESSION_PUB = SESSION_KEY.public_key().public_bytes_raw()
SESSION_ID = seed("session id", 16)
NONCE = seed("client nonce")
CLIENT_SECRET = seed("client secret")
COMMITMENT = client_commitment(CLIENT_SECRET)
TTL = 600
AK = ec_key("attestation key")
OTHER_KEY = ec_key("another key")
SELECTION = [0, 1, 2, 3, 4, 5, 6, 7, 14, 15]
WORKLOAD_PCR = 15
PINNED = (0, 7)
MODEL_FILES = {
    "model.onnx": b"onnx graph bytes",
    "model.onnx.data": b"\x00\x01\x02 weights",
    "genai_config.json": b'{"model": {"type": "llama"}}',
    "tokenizer.json": b'{"version": "1.0"}',
    "Tokenizer_extra/added_tokens.json": b"[]",
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
}
CHAT_TEMPLATE = MODEL_FILES["chat_template.jinja"].decode()
MODEL_DIGEST = compute_model_digest(
    {path: sha256(data) for path, data in MODEL_FILES.items()}, CHAT_TEMPLATE
)
RUNTIME_EVENT: dict[str, Any] = {
    "engine": "onnxruntime-genai 0.18.0",
    "provider": "cpu",
    "threads": 2,
    "decoding": {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "repetition": 1.1},
    "session_options": {"graph_optimization_level": "all", "intra_op_num_threads": 2},
    "precision": "int4",
    "cpu_features": ["avx2", "avx512f"],
    "known_answer": "ab" * 32,
    "note": 'caf\u00e9 \U0001f600 "quoted" \\ /',
    "flags": {"deterministic": True, "dev": False, "extra": None},
    "tiny": 1.5e-07,
    "large": 1e16,
}
RUNTIME_DATA = eventlog.canonical_json(RUNTIME_EVENT)


def pcr_value(index: int) -> bytes:
    return sha256(b"pcr %d" % index)


def records_for(startups: list[tuple[bytes, bytes]]) -> list[eventlog.EventRecord]:
    records = []
    for model, runtime in startups:
        for event in (
            eventlog.model_event(eventlog.ROLE_CHAT, model),
            eventlog.WorkloadEvent(eventlog.EVENT_RUNTIME, runtime),
        ):
            records.append(eventlog.EventRecord(len(records), WORKLOAD_PCR, event.digest(), event))
    return records


RECORDS = records_for([(MODEL_DIGEST, RUNTIME_DATA)])


def policy_json(**overrides: Any) -> str:
    values = {i: pcr_value(i) for i in SELECTION}
    values[WORKLOAD_PCR] = eventlog.replay(RECORDS)
    args: dict[str, Any] = {
        "pcr_selection": SELECTION,
        "pcr_values": {i: values[i] for i in PINNED},
        "workload_pcr": WORKLOAD_PCR,
        "allowed_model_digests": [MODEL_DIGEST],
        "allowed_runtime_events": [sha256(RUNTIME_DATA)],
        "pinned_public_keys": [spki(AK)],
        "max_session_ttl_seconds": 3600,
    }
    args.update(overrides)
    return build_policy(**args).to_json().decode("ascii")


# --- encoding -----------------------------------------------------------------------------


def encoding_vectors() -> dict[str, Any]:
    cases = [
        ("ab", [b"\x01", b"\x02\x03"]),
        ("encloud/v1 empty", []),
        ("encloud/v1 empty field", [b""]),
        ("encloud/v1 two empty", [b"", b""]),
        ("encloud/v1 ints", [u8(6), u32(600), u64(2**40 + 5)]),
        ("encloud/v1 long", [seed("long field", 300)]),
        ("encloud/v1 max", [bytes(65535)]),
    ]
    return {
        "description": "E(label, f1, ..., fk): label ASCII, 0x00, then u16(len(f)) || f per field",
        "suite_v1": hx(SUITE_V1.encoded()),
        "integers": [
            {"name": "u8", "value": 6, "bytes": hx(u8(6))},
            {"name": "u16", "value": 0x0020, "bytes": hx(u16(0x0020))},
            {"name": "u32", "value": 600, "bytes": hx(u32(600))},
            {"name": "u64", "value": "1099511627781", "bytes": hx(u64(2**40 + 5))},
            {"name": "u64", "value": "18446744073709551615", "bytes": hx(u64(2**64 - 1))},
        ],
        "cases": [
            {
                "label": label,
                "fields": [hx(f) if len(f) < 65535 else {"zeros": len(f)} for f in fields],
                "sha256": hx(sha256(encode(label, *fields))),
                **({"encoded": hx(encode(label, *fields))} if sum(map(len, fields)) < 1000 else {}),
            }
            for label, fields in cases
        ],
        "errors": [
            {"label": "encloud/v1 too long", "fields": [{"zeros": 65536}], "error": "ValueError"}
        ],
    }


# --- handshake ------------------------------------------------------------------------------


def evidence_base() -> dict[str, Any]:
    """The valid evidence of the shared session (also the positive evidence vector)."""
    q = quote_qualifying_data(SUITE_V1, NONCE, COMMITMENT, SESSION_PUB, SESSION_ID, TTL)
    values = {i: pcr_value(i) for i in SELECTION}
    values[WORKLOAD_PCR] = eventlog.replay(RECORDS)
    ak_public = ecc_public(AK)
    attest = quote_attest(
        signer=qualified_name(ak_public),
        extra=q,
        banks=[(SHA256, SELECTION)],
        digest=sha256(b"".join(values[i] for i in SELECTION)),
    )
    return {
        "quote_attest": attest,
        "quote_signature": tpm_sign(AK, attest),
        "ak_public": ak_public,
        "ak_certificate_chain": [],
        "pcr_hash_algorithm": SHA256,
        "pcr_values": values,
        "workload_event_log": eventlog.serialize(RECORDS),
    }


def handshake_vectors() -> tuple[dict[str, Any], dict[str, bytes]]:
    attest = evidence_base()["quote_attest"]
    h_ev = sha256(attest)
    q = quote_qualifying_data(SUITE_V1, NONCE, COMMITMENT, SESSION_PUB, SESSION_ID, TTL)
    dek, secret = seed("dek"), seed("session secret S")
    info = release_info(SUITE_V1, SESSION_ID, h_ev)
    ephemeral = x25519.X25519PrivateKey.from_private_bytes(seed("hpke ephemeral key"))
    plaintext = dek + secret + CLIENT_SECRET
    enc, ciphertext = hpke_seal_fixed(SESSION_PUB, ephemeral, info, plaintext)
    sealed_key = enc + ciphertext
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    assert suite.decrypt(sealed_key, SESSION_KEY, info=info) == plaintext
    # What a third party can do: seal its own plaintext, with a guessed client secret.
    guess = seed("a third party's guess")
    _, foreign = hpke_seal_fixed(
        SESSION_PUB, ephemeral, info, seed("foreign dek") + seed("foreign S") + guess
    )
    h_hs = handshake_hash(SUITE_V1, NONCE, SESSION_PUB, SESSION_ID, TTL, h_ev, enc)
    prk = hmac.digest(h_hs, dek + secret, "sha256")
    keys = derive_traffic_keys(dek, secret, h_hs)
    c2s, s2c, kc = bytes(keys.c2s), bytes(keys.s2c), bytes(keys.kc)
    kc_nonce = seed("nonce key confirmation", 12)
    confirmation = seal_fixed(kc, SESSION_ID, MessageType.KEY_CONFIRM, 0, 0, h_hs, kc_nonce)
    wrong_info = release_info(SUITE_V1, SESSION_ID, sha256(b"another quote"))
    tampered = bytearray(sealed_key)
    tampered[40] ^= 0x01
    other_recipient = x25519.X25519PrivateKey.from_private_bytes(seed("other recipient"))
    out = {
        "description": "one session: Q, HPKE key release (open side), H_hs, traffic keys, "
        "key confirmation",
        "suite": {"kem_id": 0x20, "kdf_id": 1, "aead_id": 2, "encoded": hx(SUITE_V1.encoded())},
        "nonce": hx(NONCE),
        "client_secret": hx(CLIENT_SECRET),
        "client_commitment_encoded": hx(encode("encloud/v2 client commitment", CLIENT_SECRET)),
        "client_commitment": hx(COMMITMENT),
        "session_private_key": hx(SESSION_KEY.private_bytes_raw()),
        "session_public_key": hx(SESSION_PUB),
        "session_id": hx(SESSION_ID),
        "ttl_seconds": TTL,
        "quote_encoded": hx(
            encode(
                "encloud/v2 quote",
                SUITE_V1.encoded(),
                NONCE,
                COMMITMENT,
                SESSION_PUB,
                SESSION_ID,
                u32(TTL),
            )
        ),
        "qualifying_data": hx(q),
        "quote_attest": hx(attest),
        "attest_digest": hx(h_ev),
        "dek": hx(dek),
        "session_secret": hx(secret),
        "release_info": hx(info),
        "hpke_ephemeral_private_key": hx(ephemeral.private_bytes_raw()),
        "enc": hx(enc),
        "sealed_key": hx(sealed_key),
        "sealed_plaintext": hx(plaintext),
        "handshake_encoded": hx(
            encode(
                "encloud/v2 handshake",
                SUITE_V1.encoded(),
                NONCE,
                SESSION_PUB,
                SESSION_ID,
                u32(TTL),
                h_ev,
                enc,
            )
        ),
        "handshake_hash": hx(h_hs),
        "prk": hx(prk),
        "k_c2s": hx(c2s),
        "k_s2c": hx(s2c),
        "k_kc": hx(kc),
        "key_confirmation": sealed_json(MessageType.KEY_CONFIRM, 0, 0, confirmation),
        "hpke_negative": [
            {
                "name": "wrong_info",
                "description": "sealed_key opened with an info naming another quote",
                "recipient_private_key": hx(SESSION_KEY.private_bytes_raw()),
                "info": hx(wrong_info),
                "sealed_key": hx(sealed_key),
                "error": "KeyOpenError",
            },
            {
                "name": "tampered_ciphertext",
                "description": "one bit of the HPKE ciphertext flipped",
                "recipient_private_key": hx(SESSION_KEY.private_bytes_raw()),
                "info": hx(info),
                "sealed_key": hx(bytes(tampered)),
                "error": "KeyOpenError",
            },
            {
                "name": "other_recipient",
                "description": "opened with a key other than the session key",
                "recipient_private_key": hx(other_recipient.private_bytes_raw()),
                "info": hx(info),
                "sealed_key": hx(sealed_key),
                "error": "KeyOpenError",
            },
        ],
        "commitment_negative": [
            {
                "name": "third_party_release",
                "description": "opens under the session key, but its client secret (a third "
                "party's guess) does not open the commitment: the server refuses it and leaves "
                "the session pending",
                "recipient_private_key": hx(SESSION_KEY.private_bytes_raw()),
                "info": hx(info),
                "sealed_key": hx(enc + foreign),
                "client_commitment": hx(COMMITMENT),
                "error": "KeyReleaseRefused",
            }
        ],
        "xwing": xwing_vectors(),
        "key_confirmation_negative": [
            {
                "name": "other_handshake",
                "description": "sealed correctly under k_kc, but the plaintext is another H_hs",
                "key_confirmation": sealed_json(
                    MessageType.KEY_CONFIRM,
                    0,
                    0,
                    seal_fixed(kc, SESSION_ID, 6, 0, 0, sha256(b"other"), kc_nonce),
                ),
                "error": "KeyConfirmationError",
            },
            {
                "name": "wrong_key",
                "description": "sealed under k_s2c instead of k_kc",
                "key_confirmation": sealed_json(
                    MessageType.KEY_CONFIRM,
                    0,
                    0,
                    seal_fixed(s2c, SESSION_ID, 6, 0, 0, h_hs, kc_nonce),
                ),
                "error": "KeyConfirmationError",
            },
            {
                "name": "wrong_request_id",
                "description": "header and associated data with request id 1",
                "key_confirmation": sealed_json(
                    MessageType.KEY_CONFIRM,
                    1,
                    0,
                    seal_fixed(kc, SESSION_ID, 6, 1, 0, h_hs, kc_nonce),
                ),
                "error": "KeyConfirmationError",
            },
        ],
    }
    return out, {"c2s": c2s, "s2c": s2c, "kc": kc}


# X-Wing encapsulation is randomised, so its vectors hold one seal made by this script's
# reference (cryptography) and one made by npm @hpke/hybridkem-x-wing 0.7.0, recorded once;
# the script checks on every run that the reference opens both (docs/PROTOCOL.md).
XWING_SEALED_BY_PYTHON = (
    "d81f7766a0a7af54b351fb1dea0d5730f9ea831f6ecc5f55177e63e3b05a09d838f0a30d55850dcaecf0c47e"
    "68ceafdaaa97a251df894e2d804887ed0494fc779f029604ffa9acf75d0e54de83358f0e64cab08134440a9e"
    "d736015d1d9dd32e5619921857f7c325c353f730117f2167c9474c5f93d2960a4c6682c47a6c8ea143c18569"
    "3e70f6174753172af8b5402efc57188cfab8770a62109dbe79ba65b381319f8adc1a2b1e63d81b10fba8b4cf"
    "ff98d76482db211b3e20a30ff9eece8e995680d86db80d5bfc64514bc5664092d3be65437897ba13a0ddc095"
    "d8c4de3b232ceafcba603c25dcd6fd9b102df3bf4d573018cf076476ee8fe697dc755a03938981d9c3e10949"
    "2a1f0853dd93116dc16a764fe619dcdc5b0cec1695638b043454a76870b2a8a7fbe4f8271cf12ee91a2bf247"
    "e196996b28c16779f7338d09e1809f3f5d09810466f6b178dafe8ad0f25517803ce5b376d21030ca37a2df60"
    "4cb53bf2813f556d3ca306a63a1003ea92e2aa6d42aa8bc06cd72267796d8e81eb8e8742592998cf5ab8d544"
    "026e853fcfc51e3919d7e514fe4191ae7959f75e767f521c5e6995882667fa530b7c1cbbeda0012b56e7c4ea"
    "97c42ca00de0e69b429831e3f3f6e083b63d92b2e925f310a1dbbd9f59e508777bb8b21ceb6f02e3344b8413"
    "ddf5257194585f3fa7b5b109d6a1e60203842355d4c44585b1b2edf74a44f7024976d5ee1f8538ed0084b3cd"
    "dd1ff6e4ad116b3485d42111ec52b0858533b1f240b31e45bf9b54c68382c60afe2138437211d996b1e93aa7"
    "a103a74a6b4dd01b8c9d802fcecd38968b01b639cadcb09448defca5b4ca050ccd8b3e2045dcfcfe47852918"
    "860e802ae8003bd56a25e4b51786d6f664aeec82bf60f5923857f337836affa866babbc5d4763251d9990fe9"
    "29b7e4bdeb693028f75fc171bf652da87142fde3e62216ee5dec59cea96e5431bd3e417093cdfb3f3dbdeaff"
    "4f81f2c0a8199092a94db46d340df4423d95fb88257abea17ec3e245d2446214c627ad4c7fd7582f750dc523"
    "c5a395c0697d54bfc44922f526fe7c3c5c302933c6484b7b98a4b0ab158ab0bb202216c0792b96672803eafe"
    "56282d1891cdce550e9bae77e3247c39c095707e2c332b1c2b8df3bc3418f0a2918a98e7154d331b5590477f"
    "2645c02016e2e6cadf172ac59014d69a950de33ef20dce87a2cb02ab915f0e8a9905732de284e7d5d6720ad4"
    "e221e872dd56ae11e6c1ed6cf6d94ca59f819b1853a4bfde5e2916d26fcfc5b3431088853fe09624c25cb4e7"
    "dbdb85910a7e56c8b7169ed122e686fda0c3e1827cd4cd5bd6fc375b904c4567fa77214a01ed00bcc4717e56"
    "b3401401f523272abfe9cc17cb7bc3751a9e36673ed59a8623420edbca536103c736dbbae23ef3435e9ae905"
    "38af820e80c6c5e21019aaec1604cdc0c87b86efc5803565008ae282317c636f26841144c11f4b2c4e1f9ad6"
    "e800e717c52e95b001fef34c60056e29b0b8c54eeb557222f5f25bafd79b42b46c5334577a8c2822249e5f34"
    "0e1f270ec07698f1005d065af8ce53d135881e0a8c866876504577a766b7b1dc6d9e529ecfa65e55c9590341"
    "fdeec2c1ee5baddf30316867d7b3ac51e309185dfad4f403866e28d42865bb1b9e8d04629a540286c6e111b5"
    "267e369b4b73d42ec2b2f137d0d6a5ba5df08b5138fa5e519fb0ab4e7c77107a2c6b4b9b534c7686aa42ad82"
)
XWING_SEALED_BY_NODE = (
    "c521df8cf972432d06c7e3a194c6ba2e742ef1eaf909d3dabae09c35c467f42e3ad1b113bf6a7873b6a6b25f"
    "7077a6bd764cc0e99fb734231cebcd736d9c37ec9320d9dc249be36a278e2566ac8417033ad65fe08a3ad306"
    "829ff4e20ca22b177a9471ab6671f1550787102ab26eb650041de1b7a51cac31c7708b6e34a7753e4386054d"
    "c2f40fbf512b0141e706b2ab80700773ae751655dbcf16b06c9d21c4fee338bbc428e76396aed1f3cb5d9dca"
    "2e536efb85b88c42f0d9249bb6226d814796d01c01d3f9061a65b34b76a790dcb0fc95ae6b051106c5c6403b"
    "64d3b4abaaff01804b3aa767f950051ebf66a7d9eabab15c0e34eedf4e986466fa01d0fa9eab0b994f73831b"
    "47a11628479e3ba47c82c89172d8f5f3c8ce4e40e0fee7b4b66d167b7029f4965bb934b56d65daf8d917d8a4"
    "3267e46484e888b29b1354dd9cf0683b23eefafc791b182c8d7144980af868026b9c3df83e389d820aa609f8"
    "9344d7064e7076620c0e485838b9bdab85381f44cd795c670aa0f286b18b5046dccd67a03e0e4766771f45ea"
    "2caa9521e624345fda1d0f3c0f471238832c2600a04653ec0f4d9bf682780ce2d1e88df296e317714b2a515f"
    "047e1c2aedac915ad612433e8c17ddd41d9b70423d7faf751b1820c7b13b54e27a2efac0256c3d98add591ab"
    "f7849a7fc86e21cdfc1eb91e5186098fff118a90b22461effcbc4655108d6c5c4b22981e64ca9dd8cac1a570"
    "df73c350125b2593b89edce4fc08c33bdf2d034e96a7ae76524d5cfb7c658d13df56b82a6a500ad7ef325cd5"
    "a6ffc78b0bf67357ed21bad16ab6f3581ce229be2bf94835bf7fd096cb105ba6a4d51e125a7fcae5ba326675"
    "95aa29607ba8f6cd5000bf025a20cd8ca5af90b56dce70c982cdcd2fb9a5541349af7f059128e3b1c92a06ef"
    "3cf9b72d8824882483b55ec02a57ad03cc8c165369c0488da3873b63aa6fba2e79037aeb0af5b7df5f626955"
    "75bae8511e1168ae923bd95abe690f529db826e6a8a4952f031faa1c85efb956e1914d5a70eaeddb7bf9a16e"
    "23f7cbe215f9ba8b24a569496c7812d1c0a49c841e38c9102b46ce24233157cfc77209949354b6d75049d215"
    "820518476cf3215ee2693d7965bb2bef050a77aa77f3b16aed3a0a9ac1b8ef26a0a16a93bb98cd92a2f84836"
    "b860a906d1891ff9136f89e3187aef6822585b7ec0cba9b36ad49f968f88b827c1eca8e775d499c79887f197"
    "25254ce9bbe880e1002d492890ddfaae8c9e350bbd2ce97329d59b41e9f1eb9b053fb9800528a1cf76d8fb78"
    "acd5dbf5146fdd0b62e05c9100c4552ba52e33118ff2242ac298dd37d40feb8276424d93d28326212e645ba0"
    "b0922b603b50ba2941fe8e64fa947ab9d5a46d36a0868adefb23815710e202a48f06043bc565d20aa0110cc1"
    "3a5ce4606203448d7551fe9851e2ebd50694610136bf1027608256f876c331a0df214b5ff8385fabf38ba49c"
    "1581c155e9e1e5732b4fb6111f1fd4f7515d7dd4585639a363246e77ffe20807072cab45eb406a7773703fc9"
    "91fc8057c6f363a738411095f6042aa3a189e31e75936f9a01a76349eea6b1d1c17695eea9239b17d7e2f9bc"
    "2bf730f36c1004d9b12833adbd26b198a46a016471529e0da9f3cef8485dc50423417dc7b2dd2d2fa9dd685c"
    "09a6ca1f2d7cdf00f496c3661711ad22d0ab896908660b6b786d5ee12d4885efbe019dc7cfc1ec33c171931a"
)


def xwing_vectors() -> dict[str, Any]:
    """The post-quantum hybrid suite: session key from its 32-byte X-Wing seed, session_pub
    (ML-KEM-768 || X25519, 1,216 bytes), Q under this suite, and two recorded seals of the
    same plaintext, one from each side."""
    import hashlib as _hashlib

    from cryptography.hazmat.primitives.asymmetric import mlkem
    from cryptography.hazmat.primitives.asymmetric import x25519 as _x

    from encloud.protocol.handshake import SUITE_XWING, open_key, xwing_private_key

    key_seed = seed("x-wing session key")
    expanded = _hashlib.shake_256(key_seed).digest(96)
    public = (
        mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64]).public_key().public_bytes_raw()
        + _x.X25519PrivateKey.from_private_bytes(expanded[64:]).public_key().public_bytes_raw()
    )
    h_ev = sha256(evidence_base()["quote_attest"])
    info = release_info(SUITE_XWING, SESSION_ID, h_ev)
    plaintext = seed("dek") + seed("session secret S") + CLIENT_SECRET
    private = xwing_private_key(key_seed)
    seals = {
        "python": bytes.fromhex(XWING_SEALED_BY_PYTHON),
        "node": bytes.fromhex(XWING_SEALED_BY_NODE),
    }
    for sealed in seals.values():
        assert bytes(b"".join(open_key(SUITE_XWING, private, sealed, info))) == plaintext
    q = quote_qualifying_data(SUITE_XWING, NONCE, COMMITMENT, public, SESSION_ID, TTL)
    enc = seals["python"][:1120]
    return {
        "suite": {
            "kem_id": SUITE_XWING.kem_id,
            "kdf_id": 1,
            "aead_id": 2,
            "encoded": hx(SUITE_XWING.encoded()),
        },
        "session_private_seed": hx(key_seed),
        "session_public_key": hx(public),
        "qualifying_data": hx(q),
        "release_info": hx(info),
        "sealed_plaintext": hx(plaintext),
        "sealed_by_python": hx(seals["python"]),
        "sealed_by_node": hx(seals["node"]),
        "handshake_hash": hx(
            handshake_hash(SUITE_XWING, NONCE, public, SESSION_ID, TTL, h_ev, enc)
        ),
    }


# --- envelope -------------------------------------------------------------------------------


def generation_request(text: str) -> bytes:
    request = pb.GenerationRequest(max_new_tokens=16, temperature=0.0, seed=7)
    request.messages.add(role=pb.ROLE_SYSTEM, content="Be brief.")
    request.messages.add(role=pb.ROLE_USER, content=text)
    request.stop.append("\n\n")
    return request.SerializeToString()


def envelope_vectors(keys: dict[str, bytes]) -> dict[str, Any]:
    aad_cases = [
        (MessageType.REQUEST, 1, 0),
        (MessageType.FRAME, 2, 5),
        (MessageType.KEY_CONFIRM, 0, 0),
        (MessageType.FINAL, 2**53 + 1, 2**32 - 1),
    ]
    pad_cases = [
        (64, b""),
        (64, seed("p60", 60)),
        (64, seed("p61", 61)),
        (128, seed("p124", 124)),
        (1024, seed("p1020", 1020)),
        (1024, seed("p1021", 1021)),
        (1024, b"\x00" * 3),
    ]
    payloads = {
        MessageType.REQUEST: ("c2s", 1, 0, generation_request("Hello")),
        MessageType.RESPONSE: (
            "s2c",
            1,
            0,
            pb.GenerationResponse(
                text="Hi.",
                final=pb.GenerationFinal(
                    finish_reason=pb.FINISH_REASON_STOP,
                    usage=pb.Usage(prompt_tokens=12, completion_tokens=2),
                    transcript_hash=seed("some T_0"),
                ),
            ).SerializeToString(),
        ),
        MessageType.FRAME: ("s2c", 2, 3, pb.GenerationChunk(text="caf\u00e9").SerializeToString()),
        MessageType.FINAL: (
            "s2c",
            2,
            4,
            pb.GenerationFinal(
                finish_reason=pb.FINISH_REASON_LENGTH,
                usage=pb.Usage(prompt_tokens=3, completion_tokens=4),
                transcript_hash=seed("some T_4"),
            ).SerializeToString(),
        ),
        MessageType.END: ("c2s", 3, 0, b""),
        MessageType.KEY_CONFIRM: ("kc", 0, 0, seed("some H_hs")),
    }
    sealed = []
    for message_type, (key_name, request_id, seq, payload) in payloads.items():
        nonce = seed(f"nonce {message_type.name}", 12)
        data = seal_fixed(keys[key_name], SESSION_ID, message_type, request_id, seq, payload, nonce)
        sealed.append(
            {
                "name": message_type.name,
                "key": key_name,
                **sealed_json(message_type, request_id, seq, data),
                "nonce": hx(nonce),
                "payload": hx(payload),
                "padded": hx(pad(payload, PAD_BUCKETS[message_type])),
                "associated_data": hx(associated_data(message_type, SESSION_ID, request_id, seq)),
            }
        )

    def bad(
        name: str,
        description: str,
        key_name: str,
        expect: tuple[int, int, int],
        header: tuple[int, int, int],
        data: bytes,
        error: str,
    ) -> dict[str, Any]:
        return {
            "name": name,
            "description": description,
            "key": key_name,
            "expected": {"type": expect[0], "request_id": expect[1], "seq": expect[2]},
            **sealed_json(*header, data),
            "error": error,
        }

    s2c, c2s = keys["s2c"], keys["c2s"]
    frame = pb.GenerationChunk(text="secret").SerializeToString()
    n = seed("nonce negative", 12)
    good = seal_fixed(s2c, SESSION_ID, 3, 5, 0, frame, n)
    flipped_tag = bytearray(good)
    flipped_tag[-1] ^= 0x80
    flipped_ct = bytearray(good)
    flipped_ct[12] ^= 0x01
    f = MessageType.FRAME
    body = struct.pack(">I", len(frame)) + frame
    negative = [
        bad(
            "tag_flipped",
            "last tag byte flipped",
            "s2c",
            (f, 5, 0),
            (f, 5, 0),
            bytes(flipped_tag),
            "DecryptError",
        ),
        bad(
            "ciphertext_flipped",
            "first ciphertext byte flipped",
            "s2c",
            (f, 5, 0),
            (f, 5, 0),
            bytes(flipped_ct),
            "DecryptError",
        ),
        bad(
            "type_in_header",
            "a FRAME presented as a FINAL",
            "s2c",
            (4, 5, 0),
            (4, 5, 0),
            good,
            "DecryptError",
        ),
        bad(
            "header_differs",
            "header seq 1 where seq 0 is expected",
            "s2c",
            (f, 5, 0),
            (f, 5, 1),
            good,
            "HeaderMismatchError",
        ),
        bad(
            "other_request",
            "a frame of request 5 relabelled as request 6",
            "s2c",
            (f, 6, 0),
            (f, 6, 0),
            good,
            "DecryptError",
        ),
        bad(
            "other_position",
            "frame 0 relabelled as frame 1",
            "s2c",
            (f, 5, 1),
            (f, 5, 1),
            good,
            "DecryptError",
        ),
        bad(
            "other_direction",
            "sealed under k_c2s, opened as server to client",
            "s2c",
            (f, 5, 0),
            (f, 5, 0),
            seal_fixed(c2s, SESSION_ID, 3, 5, 0, frame, n),
            "DecryptError",
        ),
        bad(
            "other_session",
            "sealed with another session id in the associated data",
            "s2c",
            (f, 5, 0),
            (f, 5, 0),
            seal_fixed(s2c, seed("other session", 16), 3, 5, 0, frame, n),
            "DecryptError",
        ),
        bad(
            "too_short",
            "fewer than 28 bytes",
            "s2c",
            (f, 5, 0),
            (f, 5, 0),
            good[:27],
            "DecryptError",
        ),
        bad(
            "nonzero_padding",
            "a pad byte is 0x01",
            "s2c",
            (f, 5, 0),
            (f, 5, 0),
            seal_fixed(
                s2c, SESSION_ID, 3, 5, 0, frame, n, padded=body + bytes(63 - len(body)) + b"\x01"
            ),
            "DecryptError",
        ),
        bad(
            "length_too_large",
            "u32 length beyond the plaintext",
            "s2c",
            (f, 5, 0),
            (f, 5, 0),
            seal_fixed(
                s2c, SESSION_ID, 3, 5, 0, frame, n, padded=struct.pack(">I", 61) + bytes(60)
            ),
            "DecryptError",
        ),
        bad(
            "padded_too_long",
            "padded to two buckets where one holds it",
            "s2c",
            (f, 5, 0),
            (f, 5, 0),
            seal_fixed(s2c, SESSION_ID, 3, 5, 0, frame, n, padded=body + bytes(128 - len(body))),
            "DecryptError",
        ),
        bad(
            "not_a_bucket",
            "padded length 65, not a multiple of 64",
            "s2c",
            (f, 5, 0),
            (f, 5, 0),
            seal_fixed(s2c, SESSION_ID, 3, 5, 0, frame, n, padded=body + bytes(65 - len(body))),
            "DecryptError",
        ),
        bad(
            "unpadded",
            "the payload sealed without padding",
            "s2c",
            (f, 5, 0),
            (f, 5, 0),
            seal_fixed(s2c, SESSION_ID, 3, 5, 0, frame, n, padded=frame),
            "DecryptError",
        ),
    ]
    return {
        "description": "associated data, padding, and sealed messages with fixed nonces "
        "(session of handshake.json)",
        "session_id": hx(SESSION_ID),
        "keys": {name: hx(key) for name, key in keys.items()},
        "pad_buckets": {m.name: b for m, b in PAD_BUCKETS.items()},
        "associated_data": [
            {
                "type": t,
                "request_id": str(r),
                "seq": s,
                "associated_data": hx(associated_data(t, SESSION_ID, r, s)),
            }
            for t, r, s in aad_cases
        ],
        "padding": [
            {"bucket": bucket, "payload": hx(p), "padded": hx(pad(p, bucket))}
            for bucket, p in pad_cases
        ],
        "unpad_negative": [
            {"bucket": 64, "padded": hx(b"\x00\x00\x00"), "error": "DecryptError"},
            {"bucket": 64, "padded": hx(u32(61) + bytes(60)), "error": "DecryptError"},
            {"bucket": 64, "padded": hx(u32(0) + bytes(59) + b"\x01"), "error": "DecryptError"},
            {"bucket": 64, "padded": hx(u32(0) + bytes(124)), "error": "DecryptError"},
            {"bucket": 64, "padded": hx(u32(0) + bytes(61)), "error": "DecryptError"},
            {"bucket": 1024, "padded": hx(u32(0) + bytes(60)), "error": "DecryptError"},
        ],
        "sealed": sealed,
        "negative": negative,
        "server_receive": server_receive_vectors(keys["c2s"]),
    }


def server_receive_vectors(c2s: bytes) -> list[dict[str, Any]]:
    """Two receive rules of the server, in order: each step is a sealed client message and
    what the server answers (request ids are consumed only by messages it accepted)."""
    request = generation_request("Hello")
    n = [seed(f"receive nonce {i}", 12) for i in range(4)]
    bad_pad = pad(request, 1024)[:-1] + b"\x01"  # authenticates, but a pad byte is not zero
    return [
        {
            "name": "padding_failure_consumes_no_request_id",
            "description": "a REQUEST whose tag verifies but whose padding does not is refused "
            "(ENVELOPE_REJECTED) and does not use its request id: the same id then works",
            "steps": [
                {
                    "message": sealed_json(
                        MessageType.REQUEST,
                        7,
                        0,
                        seal_fixed(c2s, SESSION_ID, 1, 7, 0, request, n[0], padded=bad_pad),
                    ),
                    "expect": "ENVELOPE_REJECTED",
                },
                {
                    "message": sealed_json(
                        MessageType.REQUEST,
                        7,
                        0,
                        seal_fixed(c2s, SESSION_ID, 1, 7, 0, request, n[1]),
                    ),
                    "expect": "accepted",
                },
            ],
        },
        {
            "name": "end_with_a_payload",
            "description": "an END must be empty: one with a payload is refused "
            "(INVALID_REQUEST_PAYLOAD), its id consumed, the session kept; an empty END with "
            "a new id ends it",
            "steps": [
                {
                    "message": sealed_json(
                        MessageType.END, 8, 0, seal_fixed(c2s, SESSION_ID, 5, 8, 0, b"bye", n[2])
                    ),
                    "expect": "INVALID_REQUEST_PAYLOAD",
                },
                {
                    "message": sealed_json(
                        MessageType.END, 9, 0, seal_fixed(c2s, SESSION_ID, 5, 9, 0, b"", n[3])
                    ),
                    "expect": "ended",
                },
            ],
        },
    ]


# --- streams and the transcript hash ----------------------------------------------------------


def stream_vectors(keys: dict[str, bytes]) -> dict[str, Any]:
    c2s, s2c = keys["c2s"], keys["s2c"]
    request_id = 2
    request_payload = generation_request("Count to three.")
    request = seal_fixed(
        c2s,
        SESSION_ID,
        MessageType.REQUEST,
        request_id,
        0,
        request_payload,
        seed("nonce stream request", 12),
    )
    t0 = transcript_start(SESSION_ID, request_id, request)
    texts = ["One", ", two", ", th", "ree.", ""]
    transcripts = [t0]
    frames = []
    payloads = []
    for s, text in enumerate(texts):
        payload = pb.GenerationChunk(text=text).SerializeToString()
        payloads.append(payload)
        transcripts.append(transcript_next(transcripts[-1], s, payload))
        frames.append(
            sealed_json(
                MessageType.FRAME,
                request_id,
                s,
                seal_fixed(
                    s2c, SESSION_ID, 3, request_id, s, payload, seed(f"nonce frame {s}", 12)
                ),
            )
        )
    n = len(texts)

    def final(
        transcript: bytes, reason: int = pb.FINISH_REASON_STOP, seq: int = n, rid: int = request_id
    ) -> dict[str, Any]:
        payload = pb.GenerationFinal(
            finish_reason=reason,  # type: ignore[arg-type]
            usage=pb.Usage(prompt_tokens=20, completion_tokens=n),
            transcript_hash=transcript,
        ).SerializeToString()
        return sealed_json(
            MessageType.FINAL,
            rid,
            seq,
            seal_fixed(s2c, SESSION_ID, 4, rid, seq, payload, seed(f"nonce final {seq}", 12)),
        )

    good_final = final(transcripts[-1])
    # A frame of another request (request 1) that says the same as frame 0.
    other = sealed_json(
        3, 1, 0, seal_fixed(s2c, SESSION_ID, 3, 1, 0, payloads[0], seed("nonce old frame", 12))
    )
    relabelled = dict(other, request_id=request_id)

    def case(
        name: str, description: str, messages: list[dict[str, Any]], error: str | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name, "description": description, "messages": messages}
        if error is None:
            out["expect"] = {
                "pieces": texts,
                "finish_reason": "stop",
                "prompt_tokens": 20,
                "completion_tokens": n,
            }
        else:
            out["error"] = error
        return out

    stream_cases = [
        case("valid", "frames 0..n-1 and the final frame with T_n", [*frames, good_final]),
        case("truncated", "the final frame dropped", frames, "TruncatedStreamError"),
        case("empty", "nothing at all", [], "TruncatedStreamError"),
        case(
            "frame_dropped",
            "frame 1 dropped",
            [frames[0], *frames[2:], good_final],
            "HeaderMismatchError",
        ),
        case(
            "frames_swapped",
            "frames 1 and 2 swapped",
            [frames[0], frames[2], frames[1], *frames[3:], good_final],
            "HeaderMismatchError",
        ),
        case(
            "frame_duplicated",
            "frame 0 sent twice",
            [frames[0], *frames, good_final],
            "HeaderMismatchError",
        ),
        case(
            "after_final",
            "a frame after the final frame",
            [*frames, good_final, frames[0]],
            "StreamOrderError",
        ),
        case(
            "final_twice",
            "the final frame sent twice",
            [*frames, good_final, good_final],
            "StreamOrderError",
        ),
        case(
            "final_early",
            "a final frame with T_n sent in place of the last frame",
            [*frames[:-1], final(transcripts[-1], seq=n - 1)],
            "TranscriptMismatchError",
        ),
        case(
            "wrong_transcript",
            "the final frame carries T_(n-1)",
            [*frames, final(transcripts[-2])],
            "TranscriptMismatchError",
        ),
        case(
            "no_finish_reason",
            "finish reason UNSPECIFIED",
            [*frames, final(transcripts[-1], reason=pb.FINISH_REASON_UNSPECIFIED)],
            "StreamOrderError",
        ),
        case(
            "replayed_frame_own_header",
            "frame 0 of request 1 replayed with its header",
            [other, *frames[1:], good_final],
            "HeaderMismatchError",
        ),
        case(
            "replayed_frame_relabelled",
            "frame 0 of request 1 relabelled as this request",
            [relabelled, *frames[1:], good_final],
            "DecryptError",
        ),
        case(
            "wrong_type",
            "a RESPONSE message inside a stream",
            [dict(frames[0], type=MessageType.RESPONSE), *frames[1:], good_final],
            "StreamOrderError",
        ),
    ]
    infer_payload = generation_request("Say hi.")
    infer_request = seal_fixed(
        c2s, SESSION_ID, 1, 1, 0, infer_payload, seed("nonce infer request", 12)
    )
    infer_t0 = transcript_start(SESSION_ID, 1, infer_request)
    response_payload = pb.GenerationResponse(
        text="Hi!",
        final=pb.GenerationFinal(
            finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=9, completion_tokens=2),
            transcript_hash=infer_t0,
        ),
    ).SerializeToString()
    response = seal_fixed(
        s2c, SESSION_ID, 2, 1, 0, response_payload, seed("nonce infer response", 12)
    )
    return {
        "description": "StreamInfer and Infer answers of the session of handshake.json: "
        "transcript T_0..T_n and stream rules",
        "session_id": hx(SESSION_ID),
        "keys": {"c2s": hx(c2s), "s2c": hx(s2c)},
        "request_id": request_id,
        "request": sealed_json(MessageType.REQUEST, request_id, 0, request),
        "request_payload": hx(request_payload),
        "transcript_encoded": hx(
            encode("encloud/v2 transcript", SESSION_ID, u64(request_id), sha256(request))
        ),
        "frame_payloads": [hx(p) for p in payloads],
        "transcripts": [hx(t) for t in transcripts],
        "cases": stream_cases,
        "infer": {
            "request_id": 1,
            "request": sealed_json(1, 1, 0, infer_request),
            "request_payload": hx(infer_payload),
            "transcript": hx(infer_t0),
            "response": sealed_json(2, 1, 0, response),
            "response_payload": hx(response_payload),
            "expect": {
                "text": "Hi!",
                "finish_reason": "stop",
                "prompt_tokens": 9,
                "completion_tokens": 2,
            },
        },
    }


# --- Embed ---------------------------------------------------------------------------------------


def embed_vectors(keys: dict[str, bytes]) -> dict[str, Any]:
    """One Embed request of 3 texts at 4 dimensions: the sealed request, the response padded
    to the 8-row bucket, and responses a client must refuse."""
    c2s, s2c = keys["c2s"], keys["s2c"]
    request_id = 3
    texts = ["A cat sat.", "Der Hund bellt.", "\u732b"]
    request_payload = embedding_request(texts, dimensions=4)
    request = seal_fixed(
        c2s,
        SESSION_ID,
        MessageType.EMBED_REQUEST,
        request_id,
        0,
        request_payload,
        seed("nonce embed request", 12),
    )
    t0 = transcript_start(SESSION_ID, request_id, request)
    vectors = [[0.5, -0.5, 0.5, -0.5], [1.0, 0.0, 0.0, 0.0], [0.0, 0.75, -0.25, 0.125]]
    flat = struct.pack(f"<{len(vectors) * 4}f", *(x for row in vectors for x in row))
    rows = padded_rows(len(texts), 64)

    def response(payload: bytes, label: str, rid: int = request_id) -> dict[str, Any]:
        sealed = seal_fixed(
            s2c, SESSION_ID, MessageType.EMBED_RESPONSE, rid, 0, payload, seed(label, 12)
        )
        return sealed_json(MessageType.EMBED_RESPONSE, rid, 0, sealed)

    good_payload = embedding_response(flat, 3, 4, rows, 17, t0)

    def as_chat_response(label: str) -> dict[str, Any]:
        """The valid payload sealed as an Infer RESPONSE of the same request."""
        sealed = seal_fixed(
            s2c, SESSION_ID, MessageType.RESPONSE, request_id, 0, good_payload, seed(label, 12)
        )
        return sealed_json(MessageType.RESPONSE, request_id, 0, sealed)

    dirty = bytearray(good_payload)
    dirty[dirty.index(flat) + len(flat) + 5] = 1  # a byte of padding row 3

    def case(name: str, description: str, message: dict[str, Any], error: str | None = None):
        out: dict[str, Any] = {"name": name, "description": description, "response": message}
        if error is not None:
            out["error"] = error
        return out

    cases = [
        case("valid", "3 vectors of 4 floats, padded to 8 rows", response(good_payload, "e0")),
        case(
            "other_transcript",
            "a response bound to another request's T_0",
            response(embedding_response(flat, 3, 4, rows, 17, sha256(b"other")), "e1"),
            "TranscriptMismatchError",
        ),
        case(
            "fewer_vectors",
            "2 vectors for 3 texts",
            response(embedding_response(flat[:32], 2, 4, rows, 17, t0), "e2"),
            "EmbeddingFormatError",
        ),
        case(
            "other_dimensions",
            "vectors of 2 components when 4 were asked for",
            response(embedding_response(flat[:24], 3, 2, rows, 17, t0), "e3"),
            "EmbeddingFormatError",
        ),
        case(
            "dirty_padding",
            "a padding row that is not zeros",
            response(bytes(dirty), "e4"),
            "EmbeddingFormatError",
        ),
        case(
            "as_infer_response",
            "the same payload sealed as a RESPONSE (an Infer answer)",
            as_chat_response("e5"),
            "HeaderMismatchError",
        ),
        case(
            "relabelled_type",
            "a RESPONSE relabelled EMBED_RESPONSE in its clear header",
            dict(
                as_chat_response("e6"),
                type=int(MessageType.EMBED_RESPONSE),
            ),
            "DecryptError",
        ),
        case(
            "not_a_message",
            "an authenticated payload that is not an EmbeddingResponse",
            response(b"\xff\xff\xff", "e8"),
            "EmbeddingFormatError",
        ),
        case(
            "other_request",
            "the valid response of request 2 relabelled as request 3",
            dict(response(good_payload, "e7", rid=2), request_id=request_id),
            "DecryptError",
        ),
    ]
    return {
        "description": "Embed: the sealed EmbeddingRequest and EmbeddingResponse of the session "
        "of handshake.json (float32 little-endian rows, zero rows to the bucket, T_0 binding)",
        "session_id": hx(SESSION_ID),
        "keys": {"c2s": hx(c2s), "s2c": hx(s2c)},
        "request_id": request_id,
        "texts": texts,
        "dimensions": 4,
        "request": sealed_json(MessageType.EMBED_REQUEST, request_id, 0, request),
        "request_payload": hx(request_payload),
        "transcript": hx(t0),
        "max_texts": 64,
        "row_buckets": {str(n): padded_rows(n, 64) for n in (1, 2, 8, 9, 32, 33, 64)},
        "expect": {"vectors": vectors, "dimensions": 4, "prompt_tokens": 17, "rows": rows},
        "response_payload": hx(good_payload),
        "cases": cases,
    }


# --- sealed files ------------------------------------------------------------------------------


def sealed_file_vectors() -> dict[str, Any]:
    """Single-segment sealed files (salt and nonce prefix fixed) and files that must not open.
    Files of several segments (1 MiB each) are too big for JSON: tests/test_sealed_file.py
    attacks those, and has the Node client open one."""
    key, other_key = seed("sealed file key"), seed("another sealed file key")

    def seal(plaintext: bytes, key_id: str = "owner-1/data", label: str = "a", k: bytes = key):
        out = io.BytesIO()
        sealed_file.seal_stream(
            io.BytesIO(plaintext),
            out,
            k,
            key_id,
            salt=seed(f"sealed salt {label}"),
            nonce_prefix=seed(f"sealed prefix {label}", 7),
        )
        return out.getvalue()

    text = "Confidential: quarterly numbers, \u00e9t\u00e9 2026.\n".encode()
    good = seal(text)
    header = sealed_file.SealedHeader("owner-1/data").encode()
    body = good[len(header) :]

    def flipped(data: bytes, offset: int) -> bytes:
        out = bytearray(data)
        out[offset] ^= 1
        return bytes(out)

    other_header = sealed_file.SealedHeader("owner-1/other").encode()
    negative = [
        ("bit_flip_in_segment", flipped(good, len(good) - 20), "SealedFileDecryptError"),
        ("bit_flip_in_tag", flipped(good, len(good) - 1), "SealedFileDecryptError"),
        ("bit_flip_in_salt", flipped(good, len(header) + 5), "SealedFileDecryptError"),
        ("bit_flip_in_nonce_prefix", flipped(good, len(header) + 35), "SealedFileDecryptError"),
        ("key_id_renamed", other_header + body, "SealedFileDecryptError"),
        ("truncated_inside_tag", good[:-1], "SealedFileDecryptError"),
        ("segment_dropped", good[: len(header) + 40], "SealedFileDecryptError"),
        ("trailing_bytes", good + b"\x00", "SealedFileDecryptError"),
        ("other_key", seal(text, k=other_key), "SealedFileDecryptError"),
        ("wrong_magic", b"ENCLSEAM" + good[8:], "SealedFileFormatError"),
        ("version_2", good[:8] + b"\x02" + good[9:], "SealedFileFormatError"),
        ("empty_key_id", b"ENCLSEAL\x01\x00" + body, "SealedFileFormatError"),
        ("key_id_not_ascii", b"ENCLSEAL\x01\x01\xff" + body, "SealedFileFormatError"),
        (
            "tink_header_length",
            good[: len(header)] + b"\x29" + good[len(header) + 1 :],
            "SealedFileFormatError",
        ),
        ("header_cut", good[:12], "SealedFileFormatError"),
    ]
    return {
        "description": "sealed files: the encloud header, Tink's AES-GCM-HKDF streaming format "
        "(1 MiB segments) with the header as associated data; files that open and files that "
        "must not (each with its error)",
        "key": hx(key),
        "segment_size": sealed_file.SEGMENT_SIZE,
        "positive": [
            {
                "name": name,
                "key_id": key_id,
                "salt": hx(seed(f"sealed salt {label}")),
                "nonce_prefix": hx(seed(f"sealed prefix {label}", 7)),
                "header": hx(sealed_file.SealedHeader(key_id).encode()),
                "file_key": hx(
                    _hkdf_sha256(
                        key, seed(f"sealed salt {label}"), sealed_file.SealedHeader(key_id).encode()
                    )
                ),
                "plaintext": hx(plaintext),
                "sealed": hx(seal(plaintext, key_id, label)),
            }
            for name, plaintext, key_id, label in (
                ("text", text, "owner-1/data", "a"),
                ("empty", b"", "k", "b"),
                ("binary_4k", seed("sealed binary", 4096), "owner-2:files.v1", "c"),
            )
        ],
        "negative": [
            {"name": name, "sealed": hx(data), "error": error} for name, data, error in negative
        ],
        "expected_key_id": {
            "sealed": hx(good),
            "expected": "owner-1/other",
            "error": "SealedFileKeyIdError",
        },
    }


def _hkdf_sha256(key: bytes, salt: bytes, info: bytes) -> bytes:
    prk = _hkdf_extract(salt, key)
    return _hkdf_expand(prk, info, 32)


# --- Sentinel: release orders and the key broker's qualifying data -------------------------------


# A release of version 2 of owner-1/data sealed to the X25519 workload key of seed
# "sentinel workload key" (HPKE encapsulation is random: recorded once, checked on every run).
SENTINEL_RELEASE_SEALED = (
    "e2a7677e5ca5114eccdc33eda5a9037542cf4005fe0f05b8113f09225ec75651a47847888c4a31b02ef403a6"
    "136e06f3fa19101d5458f573b0d3fa1e371203c2e5832146d4d526f500725d7c22c1e464"
)


def sentinel_vectors() -> dict[str, Any]:
    """Owner-signed release orders (Ed25519: deterministic), the qualifying data a workload
    binds when it asks Sentinel for a key, and each quote offered where the other belongs."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    owner = Ed25519PrivateKey.from_private_bytes(seed("owner signing key"))
    other = Ed25519PrivateKey.from_private_bytes(seed("another owner"))
    now = 1_790_000_000
    order = release_order.ReleaseOrder(
        key_id="owner-1/data",
        model_digest=MODEL_DIGEST,
        expires_at=now + 600,
        order_id=seed("order id", 16),
    )
    signed = release_order.sign_order(order, owner)
    obj = json.loads(signed)

    def canon(o: Any) -> bytes:
        import rfc8785

        return rfc8785.dumps(o)

    def with_order(**changes: Any) -> bytes:
        body = {**obj["order"], **changes}
        return canon({"order": body, "signature": obj["signature"]})

    negative = [
        ("other_owner", release_order.sign_order(order, other), "ReleaseOrderSignatureError"),
        ("key_id_changed", with_order(key_id="owner-1/other"), "ReleaseOrderSignatureError"),
        (
            "model_changed",
            with_order(model_digest=hx(seed("other model"))),
            "ReleaseOrderSignatureError",
        ),
        ("expiry_extended", with_order(expires_at=now + 6000), "ReleaseOrderSignatureError"),
        (
            "expired",
            release_order.sign_order(dataclass_replace(order, expires_at=now - 1), owner),
            "ReleaseOrderExpiredError",
        ),
        ("version_2", with_order(version=2), "ReleaseOrderFormatError"),
        ("extra_key", with_order(note="x"), "ReleaseOrderFormatError"),
        ("not_canonical", signed.replace(b'{"order":', b'{ "order":'), "ReleaseOrderFormatError"),
        ("short_order_id", with_order(order_id="00"), "ReleaseOrderFormatError"),
        (
            "signature_not_base64",
            canon({"order": obj["order"], "signature": "!"}),
            "ReleaseOrderFormatError",
        ),
    ]
    nonce, hpke_pub = seed("sentinel nonce"), seed("workload hpke public key")
    q_sentinel = sentinel_qualifying_data(SUITE_V1, nonce, order.digest(), hpke_pub)
    session = evidence_base()
    values = session["pcr_values"]
    attest = quote_attest(
        signer=qualified_name(session["ak_public"]),
        extra=q_sentinel,
        banks=[(SHA256, SELECTION)],
        digest=sha256(b"".join(values[i] for i in SELECTION)),
    )
    sentinel_evidence = {**session, "quote_attest": attest, "quote_signature": tpm_sign(AK, attest)}
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from encloud.protocol import key_broker

    workload_key = X25519PrivateKey.from_private_bytes(seed("sentinel workload key"))
    data_key = seed("owner data key v2")
    release = key_broker.release_info(SUITE_V1, nonce, order.digest(), order.key_id, 2)
    sealed = bytes.fromhex(SENTINEL_RELEASE_SEALED)
    assert key_broker.open_data_key(SUITE_V1, workload_key, sealed, release) == data_key
    return {
        "description": "release orders signed by an owner (Ed25519), their digests, orders "
        "Sentinel refuses; the qualifying data of a workload's key request, and each kind of "
        "quote offered where the other belongs; the HPKE info of a key import, and a released "
        "key that opens as its version and not as another",
        "owner_public_key": hx(owner.public_key().public_bytes_raw()),
        "now": now,
        "order": {
            "signed": signed.decode(),
            "signed_message": hx(order.signed_bytes()),
            "digest": hx(order.digest()),
        },
        "negative_orders": [
            {"name": name, "signed": data.decode("utf-8", "replace"), "error": error}
            for name, data, error in negative
        ],
        "qualifying_data": {
            "suite": hx(SUITE_V1.encoded()),
            "nonce": hx(nonce),
            "order_digest": hx(order.digest()),
            "hpke_public_key": hx(hpke_pub),
            "encoded": hx(
                encode("encloud/v2 sentinel", SUITE_V1.encoded(), nonce, order.digest(), hpke_pub)
            ),
            "q": hx(q_sentinel),
        },
        "import_info": {
            "key_id": order.key_id,
            "version": 1,
            "encoded": hx(key_broker.import_info(order.key_id, 1)),
        },
        "release": {
            "suite": hx(SUITE_V1.encoded()),
            "nonce": hx(nonce),
            "order_digest": hx(order.digest()),
            "key_id": order.key_id,
            "version": 2,
            "info": hx(release),
            "workload_private_key": hx(seed("sentinel workload key")),
            "sealed_key": SENTINEL_RELEASE_SEALED,
            "key": hx(data_key),
            "refused_as_version": 1,
        },
        "cross_use": [
            {
                "name": "session_quote_offered_to_sentinel",
                "evidence": evidence_json(session),
                "expected_qualifying_data": hx(q_sentinel),
                "error": "NonceMismatchError",
            },
            {
                "name": "sentinel_quote_offered_as_a_session",
                "evidence": evidence_json(sentinel_evidence),
                "expected_qualifying_data": hx(
                    quote_qualifying_data(SUITE_V1, NONCE, COMMITMENT, SESSION_PUB, SESSION_ID, TTL)
                ),
                "error": "NonceMismatchError",
            },
            {
                "name": "sentinel_quote_to_sentinel",
                "evidence": evidence_json(sentinel_evidence),
                "expected_qualifying_data": hx(q_sentinel),
            },
        ],
        "policy": policy_json(),
        "ttl_seconds": TTL,
    }


# --- event log and model digest -----------------------------------------------------------------


def job_vectors() -> dict[str, Any]:
    """Job manifests signed by an owner (Ed25519: deterministic), their digests, manifests
    Sentinel refuses; the qualifying data of a job's key request; the proof that ends a
    release; an answers file's lines and the files `encloud open --manifest` refuses."""
    import rfc8785
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from encloud.protocol import job

    owner = Ed25519PrivateKey.from_private_bytes(seed("owner signing key"))
    other = Ed25519PrivateKey.from_private_bytes(seed("another owner"))
    now = 1_790_000_000
    manifest = job.JobManifest(
        job_id=seed("job id", 16),
        key_id="owner-1/data",
        model_digest=MODEL_DIGEST,
        input_sha256=seed("sealed input"),
        records=3,
        output="answers-1.sealed",
        expires_at=now + 600,
        params={"max_new_tokens": 64, "temperature": 0.7, "stop": ["\n\n"]},
    )
    signed = job.sign_manifest(manifest, owner)
    obj = json.loads(signed)

    def with_manifest(**changes: Any) -> bytes:
        body = {**obj["manifest"], **changes}
        return rfc8785.dumps({"manifest": body, "signature": obj["signature"]})

    negative = [
        ("other_owner", job.sign_manifest(manifest, other), "ReleaseOrderSignatureError"),
        (
            "input_changed",
            with_manifest(input_sha256=hx(seed("other"))),
            "ReleaseOrderSignatureError",
        ),
        ("records_changed", with_manifest(records=4), "ReleaseOrderSignatureError"),
        ("output_changed", with_manifest(output="x.sealed"), "ReleaseOrderSignatureError"),
        (
            "params_changed",
            with_manifest(params={"max_new_tokens": 65}),
            "ReleaseOrderSignatureError",
        ),
        (
            "expired",
            job.sign_manifest(dataclass_replace(manifest, expires_at=now - 1), owner),
            "ReleaseOrderExpiredError",
        ),
        ("version_2", with_manifest(version=2), "ReleaseOrderFormatError"),
        ("extra_key", with_manifest(note="x"), "ReleaseOrderFormatError"),
        ("output_a_path", with_manifest(output="../x"), "ReleaseOrderFormatError"),
        ("unknown_param", with_manifest(params={"seed": 1}), "ReleaseOrderFormatError"),
        ("no_records", with_manifest(records=0), "ReleaseOrderFormatError"),
        (
            "not_canonical",
            signed.replace(b'{"manifest":', b'{ "manifest":'),
            "ReleaseOrderFormatError",
        ),
    ]
    nonce, hpke_pub = seed("sentinel nonce"), seed("workload hpke public key")
    q_job = job.job_qualifying_data(
        SUITE_V1, nonce, manifest.digest(), manifest.input_sha256, hpke_pub
    )
    data_key = seed("owner data key v2")
    answers = [
        job.answer_line(manifest.digest(), i, f"answer {i}", "stop", 10 + i, 3 + i)
        for i in range(3)
    ]
    end = job.end_line(manifest.digest(), 3)
    other_job = job.answer_line(seed("another manifest"), 1, "answer 1", "stop", 11, 4)
    refused = [
        ("swapped", [answers[1], answers[0], answers[2], end]),
        ("dropped", [answers[0], answers[2], end]),
        ("dropped_last", [answers[0], answers[1], end]),
        ("no_end_line", answers),
        ("after_the_end", [*answers, end, answers[0]]),
        ("another_jobs_answer", [answers[0], other_job, answers[2], end]),
    ]
    return {
        "description": "job manifests signed by an owner (Ed25519), their digests, manifests "
        "Sentinel refuses; the qualifying data of a job's key request; the proof that ends a "
        "release; an answers file's lines, and answers files refused at open",
        "owner_public_key": hx(owner.public_key().public_bytes_raw()),
        "now": now,
        "manifest": {
            "signed": signed.decode(),
            "signed_message": hx(manifest.signed_bytes()),
            "digest": hx(manifest.digest()),
        },
        "negative_manifests": [
            {"name": name, "signed": data.decode("utf-8", "replace"), "error": error}
            for name, data, error in negative
        ],
        "qualifying_data": {
            "suite": hx(SUITE_V1.encoded()),
            "nonce": hx(nonce),
            "manifest_digest": hx(manifest.digest()),
            "input_sha256": hx(manifest.input_sha256),
            "hpke_public_key": hx(hpke_pub),
            "q": hx(q_job),
        },
        "end_proofs": [
            {
                "key": hx(data_key),
                "job_id": hx(manifest.job_id),
                "release_seq": seq,
                "outcome": outcome,
                "answers_sha256": hx(answers_sha),
                "records_done": records,
                "proof": hx(
                    job.end_proof(data_key, manifest.job_id, seq, outcome, answers_sha, records)
                ),
            }
            for seq, outcome, answers_sha, records in (
                (1, job.PAUSED, b"", 2),
                (2, job.DONE, seed("answers file"), 3),
            )
        ],
        "answers": {
            "lines": [line.decode() for line in [*answers, end]],
            "refused": [
                {"name": name, "lines": [line.decode() for line in lines]}
                for name, lines in refused
            ],
        },
    }


def sequence_vectors() -> list[dict[str, Any]]:
    """Logs whose records are well formed, and how the start-up grammar reads them: model
    events (roles chat then embeddings, none twice) then one runtime event."""
    chat, embed = MODEL_DIGEST, seed("embedding model")
    runtime = eventlog.WorkloadEvent(eventlog.EVENT_RUNTIME, RUNTIME_DATA)

    def model(role: str, digest: bytes) -> eventlog.WorkloadEvent:
        return eventlog.model_event(role, digest)

    def raw(data: bytes) -> eventlog.WorkloadEvent:
        return eventlog.WorkloadEvent(eventlog.EVENT_MODEL, data)

    def log(*events: eventlog.WorkloadEvent) -> str:
        records = [
            eventlog.EventRecord(i, WORKLOAD_PCR, e.digest(), e) for i, e in enumerate(events)
        ]
        return eventlog.serialize(records).decode("ascii")

    def ok(name: str, events: tuple, models: list[dict[str, str]]) -> dict[str, Any]:
        return {"name": name, "log": log(*events), "startups": models}

    def bad(name: str, events: tuple) -> dict[str, Any]:
        return {"name": name, "log": log(*events), "error": "EventSequenceError"}

    c, e = model("chat", chat), model("embeddings", embed)
    return [
        ok("chat", (c, runtime), [{"chat": hx(chat)}]),
        ok("embeddings_only", (e, runtime), [{"embeddings": hx(embed)}]),
        ok("both", (c, e, runtime), [{"chat": hx(chat), "embeddings": hx(embed)}]),
        ok(
            "restart_adds_embeddings",
            (c, runtime, c, e, runtime),
            [{"chat": hx(chat)}, {"chat": hx(chat), "embeddings": hx(embed)}],
        ),
        bad("embeddings_before_chat", (e, c, runtime)),
        bad("role_twice", (c, c, runtime)),
        bad("no_model", (runtime,)),
        bad("no_runtime", (c,)),
        bad("raw_32_byte_digest", (raw(chat), runtime)),
        bad(
            "unknown_role",
            (raw(eventlog.canonical_json({"digest": hx(chat), "role": "x"})), runtime),
        ),
        bad(
            "extra_key",
            (raw(eventlog.canonical_json({"digest": hx(chat), "role": "chat", "v": 1})), runtime),
        ),
        bad(
            "not_canonical",
            (raw(b'{"role":"chat","digest":"' + hx(chat).encode() + b'"}'), runtime),
        ),
        bad(
            "short_digest",
            (raw(eventlog.canonical_json({"digest": "00", "role": "chat"})), runtime),
        ),
        bad(
            "digest_with_space",
            (
                raw(
                    eventlog.canonical_json(
                        {"digest": hx(chat)[:2] + " " + hx(chat)[2:], "role": "chat"}
                    )
                ),
                runtime,
            ),
        ),
        bad(
            "uppercase_hex",
            (raw(eventlog.canonical_json({"digest": hx(chat).upper(), "role": "chat"})), runtime),
        ),
    ]


def eventlog_vectors() -> dict[str, Any]:
    two = records_for([(MODEL_DIGEST, RUNTIME_DATA), (seed("older model"), b'{"a":1}')])
    pcr = bytes(32)
    steps = []
    for record in two:
        pcr = eventlog.extend(pcr, record.digest)
        steps.append(
            {
                "event_type": record.event.event_type,
                "data": hx(record.event.data),
                "measured": hx(record.event.measured_bytes()),
                "digest": hx(record.digest),
                "pcr_after": hx(pcr),
                "line": record.to_json_line().decode("ascii"),
            }
        )
    files = sorted(MODEL_FILES, key=lambda p: p.encode())
    fields = [p.encode() + b"\x00" + sha256(MODEL_FILES[p]) for p in files]
    fields.append(sha256(CHAT_TEMPLATE.encode()))
    samples = [
        "[]",
        "{}",
        "0.1",
        "-0.0",
        "1e+22",
        "123456789012345678901234567890",
        '{"a":1e-07}',
        '{"b":1,"a":2}',
        '{"a": 1}',
        '{"a":1,"a":1}',
        '{"a":1.00}',
        '{"a":1e-7}',
        '{"a":"\\u00E9"}',
        '{"a":"\u00e9"}',
        '{"a":"\\/"}',
        '{"a":-0}',
        '{"a":1E5}',
        '{"a":100000000000000000.0}',
        '{"a":1e+16}',
        '{"a":"\\u007f"}',
        '{"a":true}',
    ]
    canonical = [
        {"json": text, "canonical": eventlog.canonical_json(json.loads(text)) == text.encode()}
        for text in samples
    ]
    canonical.append({"json": RUNTIME_DATA.decode("ascii"), "canonical": True})
    return {
        "sequences": sequence_vectors(),
        "description": "workload events: measured bytes, digests, PCR replay, CEL-JSON lines; "
        "the model digest; canonical JSON",
        "events": steps,
        "log": eventlog.serialize(two).decode("ascii"),
        "runtime_event_data": RUNTIME_DATA.decode("ascii"),
        "model_digest": {
            "files": {p: base64.b64encode(MODEL_FILES[p]).decode() for p in files},
            "file_sha256": {p: hx(sha256(MODEL_FILES[p])) for p in files},
            "chat_template": CHAT_TEMPLATE,
            "sorted_paths": files,
            "encoded": hx(encode("encloud/v1 model", *fields)),
            "model_digest": hx(MODEL_DIGEST),
        },
        "canonical_json": canonical,
    }


# --- evidence ---------------------------------------------------------------------------------


def evidence_json(ev: dict[str, Any]) -> dict[str, Any]:
    return {
        "quote_attest": hx(ev["quote_attest"]),
        "quote_signature": hx(ev["quote_signature"]),
        "ak_public": hx(ev["ak_public"]),
        "ak_certificate_chain": [hx(c) for c in ev["ak_certificate_chain"]],
        "pcr_hash_algorithm": ev["pcr_hash_algorithm"],
        "pcr_values": {str(i): hx(v) for i, v in sorted(ev["pcr_values"].items())},
        "workload_event_log": hx(ev["workload_event_log"]),
    }


def client_json(**overrides: Any) -> dict[str, Any]:
    values = {
        "nonce": NONCE,
        "client_commitment": COMMITMENT,
        "session_public_key": SESSION_PUB,
        "session_id": SESSION_ID,
        "ttl_seconds": TTL,
    }
    values.update(overrides)
    return {k: (hx(v) if isinstance(v, bytes) else v) for k, v in values.items()}


def evidence_vectors() -> dict[str, Any]:
    base = evidence_base()
    base_values = base["pcr_values"]
    q = quote_qualifying_data(SUITE_V1, NONCE, COMMITMENT, SESSION_PUB, SESSION_ID, TTL)
    ak_public = base["ak_public"]

    def quote(
        *,
        key: ec.EllipticCurvePrivateKey = AK,
        public: bytes = ak_public,
        values: dict[int, bytes] | None = None,
        sig_hash: int = SHA256,
        digest: bytes | None = None,
        trailing: bytes = b"",
        **attest_kw: Any,
    ) -> dict[str, Any]:
        vals = dict(base_values if values is None else values)
        args: dict[str, Any] = {
            "signer": qualified_name(public),
            "extra": q,
            "banks": [(SHA256, sorted(vals))],
            "digest": digest
            if digest is not None
            else sha256(b"".join(vals[i] for i in sorted(vals))),
        }
        args.update(attest_kw)
        attest = quote_attest(**args) + trailing
        return dict(
            base,
            quote_attest=attest,
            quote_signature=tpm_sign(key, attest, sig_hash),
            ak_public=public,
            pcr_values=vals,
        )

    def with_log(
        records: list[eventlog.EventRecord],
        raw: bytes | None = None,
    ) -> dict[str, Any]:
        log = raw if raw is not None else eventlog.serialize(records)
        values = dict(base_values)
        values[WORKLOAD_PCR] = eventlog.replay(records)
        return dict(quote(values=values), workload_event_log=log)

    model_ev, runtime_ev = RECORDS
    policies = {
        "base": policy_json(),
        "other_model": policy_json(allowed_model_digests=[seed("another model")]),
        "other_runtime": policy_json(allowed_runtime_events=[seed("another runtime")]),
        "short_ttl": policy_json(max_session_ttl_seconds=599),
    }
    edited = eventlog.EventRecord(
        1, WORKLOAD_PCR, runtime_ev.digest, eventlog.WorkloadEvent("runtime", b'{"threads":64}')
    )
    other_pcr_events = [eventlog.EventRecord(r.recnum, 14, r.digest, r.event) for r in RECORDS]
    unordered = [
        eventlog.EventRecord(0, WORKLOAD_PCR, runtime_ev.digest, runtime_ev.event),
        eventlog.EventRecord(1, WORKLOAD_PCR, model_ev.digest, model_ev.event),
    ]
    noncanon_runtime = records_for([(MODEL_DIGEST, b'{"threads": 2}')])
    unlogged = dict(base_values)
    unlogged[WORKLOAD_PCR] = eventlog.extend(base_values[WORKLOAD_PCR], seed("unlogged"))
    changed0 = dict(base_values)
    changed0[0] = seed("changed firmware")
    sha1_bank = quote(banks=[(SHA1, SELECTION)])
    extra_bank = quote(banks=[(SHA256, SELECTION), (SHA384, SELECTION)])
    fewer = dict(base_values)
    del fewer[14]
    missing_value = dict(base_values)
    del missing_value[3]
    short_value = dict(base_values)
    short_value[3] = base_values[3][:20]
    edited_value = dict(base_values)
    edited_value[3] = seed("edited pcr 3")

    negatives: list[tuple[str, str, dict[str, Any], str, dict[str, Any], str]] = [
        # (name, description, evidence, policy, client overrides, error class)
        (
            "ak_not_pinned",
            "a valid quote by a key the policy does not pin",
            quote(key=OTHER_KEY, public=ecc_public(OTHER_KEY)),
            "base",
            {},
            "AkUntrustedError",
        ),
        (
            "ak_not_restricted",
            "the pinned key without the restricted attribute",
            quote(public=ecc_public(AK, attributes=AK_ATTRIBUTES & ~RESTRICTED)),
            "base",
            {},
            "AkAttributesError",
        ),
        (
            "ak_decrypt",
            "the pinned key with the decrypt attribute",
            quote(public=ecc_public(AK, attributes=AK_ATTRIBUTES | DECRYPT)),
            "base",
            {},
            "AkAttributesError",
        ),
        (
            "ak_not_fixed_tpm",
            "the pinned key without fixedTPM",
            quote(public=ecc_public(AK, attributes=AK_ATTRIBUTES & ~FIXED_TPM)),
            "base",
            {},
            "AkAttributesError",
        ),
        (
            "ak_symmetric",
            "the pinned key with an AES-128-CFB symmetric algorithm",
            quote(public=ecc_public(AK, symmetric=u16(AES) + u16(128) + u16(CFB))),
            "base",
            {},
            "AkAttributesError",
        ),
        (
            "ak_trailing_bytes",
            "TPMT_PUBLIC with a trailing byte",
            dict(base, ak_public=ak_public + b"\x00"),
            "base",
            {},
            "MalformedEvidenceError",
        ),
        (
            "ak_sha1_name",
            "TPMT_PUBLIC with nameAlg SHA-1",
            dict(base, ak_public=ak_public[:2] + u16(SHA1) + ak_public[4:]),
            "base",
            {},
            "MalformedEvidenceError",
        ),
        (
            "signature_other_bytes",
            "the signature of another TPMS_ATTEST",
            dict(base, quote_signature=tpm_sign(AK, base["quote_attest"] + b"x")),
            "base",
            {},
            "SignatureError",
        ),
        (
            "signature_other_key",
            "signed by another key",
            dict(base, quote_signature=tpm_sign(OTHER_KEY, base["quote_attest"])),
            "base",
            {},
            "SignatureError",
        ),
        (
            "signature_other_hash",
            "ECDSA-SHA384 where the key's scheme is ECDSA-SHA256",
            dict(base, quote_signature=tpm_sign(AK, base["quote_attest"], SHA384)),
            "base",
            {},
            "SignatureError",
        ),
        (
            "signature_sha1",
            "a TPMT_SIGNATURE naming SHA-1",
            dict(base, quote_signature=u16(ECDSA) + u16(SHA1) + base["quote_signature"][4:]),
            "base",
            {},
            "MalformedEvidenceError",
        ),
        (
            "signature_trailing_bytes",
            "TPMT_SIGNATURE with a trailing byte",
            dict(base, quote_signature=base["quote_signature"] + b"\x00"),
            "base",
            {},
            "MalformedEvidenceError",
        ),
        (
            "signature_flipped",
            "one bit of s flipped",
            dict(
                base,
                quote_signature=base["quote_signature"][:-1]
                + bytes([base["quote_signature"][-1] ^ 1]),
            ),
            "base",
            {},
            "SignatureError",
        ),
        (
            "attest_trailing_bytes",
            "a signed TPMS_ATTEST with a trailing byte",
            quote(trailing=b"\x00"),
            "base",
            {},
            "MalformedEvidenceError",
        ),
        (
            "attest_magic",
            "signed, but magic is not TPM_GENERATED_VALUE",
            quote(magic=0xFF544348),
            "base",
            {},
            "AttestMagicError",
        ),
        (
            "attest_type",
            "signed, but a certify structure, not a quote",
            quote(attest_type=ST_CERTIFY),
            "base",
            {},
            "AttestTypeError",
        ),
        (
            "qualified_signer",
            "qualifiedSigner names another key",
            quote(signer=qualified_name(ecc_public(OTHER_KEY))),
            "base",
            {},
            "QualifiedSignerError",
        ),
        (
            "wrong_nonce",
            "the quote is over another nonce than the client sent",
            base,
            "base",
            {"nonce": seed("another nonce")},
            "NonceMismatchError",
        ),
        (
            "replayed_session",
            "a stale quote for another session id",
            base,
            "base",
            {"session_id": seed("another session", 16)},
            "NonceMismatchError",
        ),
        (
            "session_key_swapped",
            "an on-path party replaced the session public key",
            base,
            "base",
            {"session_public_key": seed("attacker key")},
            "NonceMismatchError",
        ),
        (
            "ttl_changed",
            "the reply's TTL differs from the quoted one",
            base,
            "base",
            {"ttl_seconds": 601},
            "NonceMismatchError",
        ),
        (
            "pcr_fewer",
            "the quote selects fewer PCRs than the policy",
            quote(values=fewer),
            "base",
            {},
            "PcrSelectionError",
        ),
        (
            "pcr_sha1_bank",
            "the quote covers the SHA-1 bank",
            sha1_bank,
            "base",
            {},
            "PcrSelectionError",
        ),
        (
            "pcr_extra_bank",
            "the quote covers two banks",
            extra_bank,
            "base",
            {},
            "PcrSelectionError",
        ),
        (
            "pcr_evidence_bank",
            "the evidence names the SHA-384 bank",
            dict(base, pcr_hash_algorithm=SHA384),
            "base",
            {},
            "PcrSelectionError",
        ),
        (
            "pcr_value_edited",
            "a shipped PCR value differs from the quoted digest",
            dict(base, pcr_values=edited_value),
            "base",
            {},
            "PcrDigestError",
        ),
        (
            "pcr_value_missing",
            "a selected PCR value is not shipped",
            dict(base, pcr_values=missing_value),
            "base",
            {},
            "PcrDigestError",
        ),
        (
            "pcr_value_short",
            "a shipped PCR value is 20 bytes",
            dict(base, pcr_values=short_value),
            "base",
            {},
            "PcrDigestError",
        ),
        (
            "pcr_digest_other",
            "pcrDigest over other values",
            quote(digest=seed("digest")),
            "base",
            {},
            "PcrDigestError",
        ),
        (
            "pcr_pinned_differs",
            "PCR 0 (pinned) has another value, quoted and signed",
            quote(values=changed0),
            "base",
            {},
            "PcrValueError",
        ),
        (
            "log_not_json",
            "the event log is not JSON lines",
            dict(base, workload_event_log=b"not json\n"),
            "base",
            {},
            "EventLogFormatError",
        ),
        (
            "log_no_newline",
            "the last record has no newline",
            dict(base, workload_event_log=base["workload_event_log"][:-1]),
            "base",
            {},
            "EventLogFormatError",
        ),
        (
            "log_not_canonical",
            "a record with a space after a colon",
            dict(
                base,
                workload_event_log=base["workload_event_log"].replace(b'"pcr":15', b'"pcr": 15', 1),
            ),
            "base",
            {},
            "EventLogFormatError",
        ),
        (
            "log_recnum_gap",
            "recnums 0, 2",
            dict(
                base,
                workload_event_log=eventlog.serialize(
                    [
                        model_ev,
                        eventlog.EventRecord(2, WORKLOAD_PCR, runtime_ev.digest, runtime_ev.event),
                    ]
                ),
            ),
            "base",
            {},
            "EventLogFormatError",
        ),
        (
            "log_unknown_event",
            "an event type the protocol does not define",
            dict(
                base,
                workload_event_log=base["workload_event_log"].replace(
                    b'"event_type":"runtime"', b'"event_type":"runtimx"'
                ),
            ),
            "base",
            {},
            "EventLogFormatError",
        ),
        (
            "event_edited",
            "the runtime event's content edited, digest kept",
            dict(base, workload_event_log=eventlog.serialize([model_ev, edited])),
            "base",
            {},
            "EventDigestError",
        ),
        (
            "event_other_pcr",
            "the records name PCR 14",
            with_log(other_pcr_events),
            "base",
            {},
            "EventDigestError",
        ),
        (
            "log_unlogged_extend",
            "the workload PCR holds an extend nobody logged",
            quote(values=unlogged),
            "base",
            {},
            "EventLogReplayError",
        ),
        (
            "log_reordered_only",
            "records reordered (renumbered), PCR unchanged",
            dict(base, workload_event_log=eventlog.serialize(unordered)),
            "base",
            {},
            "EventLogReplayError",
        ),
        (
            "log_reordered",
            "runtime before model, replayed into the PCR",
            with_log(unordered),
            "base",
            {},
            "EventSequenceError",
        ),
        (
            "log_truncated",
            "only the model event, replayed into the PCR",
            with_log([model_ev]),
            "base",
            {},
            "EventSequenceError",
        ),
        (
            "log_empty",
            "no record at all, PCR at zero",
            with_log([]),
            "base",
            {},
            "EventSequenceError",
        ),
        (
            "runtime_not_canonical",
            "the runtime event is JSON but not canonical",
            with_log(noncanon_runtime),
            "base",
            {},
            "EventSequenceError",
        ),
        (
            "model_not_allowed",
            "the model digest is not in the policy",
            base,
            "other_model",
            {},
            "ModelNotAllowedError",
        ),
        (
            "runtime_not_allowed",
            "the runtime event is not in the policy",
            base,
            "other_runtime",
            {},
            "RuntimeNotAllowedError",
        ),
        (
            "ttl_too_long",
            "the session TTL exceeds the policy's maximum",
            base,
            "short_ttl",
            {},
            "SessionTtlError",
        ),
    ]
    zero_ttl_q = quote_qualifying_data(SUITE_V1, NONCE, COMMITMENT, SESSION_PUB, SESSION_ID, 0)
    zero_ttl = quote(extra=zero_ttl_q)
    negatives.append(
        (
            "ttl_zero",
            "a session TTL of zero",
            zero_ttl,
            "base",
            {"ttl_seconds": 0},
            "SessionTtlError",
        )
    )
    return {
        "description": "evidence against a policy: the valid one, and attacks expressed as "
        "bytes with the typed error every client must raise",
        "suite": hx(SUITE_V1.encoded()),
        "policies": policies,
        "positive": [
            {
                "name": "valid",
                "policy": "base",
                "client": client_json(),
                "evidence": evidence_json(base),
                "expect": {
                    "qualifying_data": hx(q),
                    "attest_digest": hx(sha256(base["quote_attest"])),
                    "ak_spki": hx(spki(AK)),
                    "ak_fingerprint": hx(sha256(spki(AK))),
                    "model_digest": hx(MODEL_DIGEST),
                    "runtime_event": hx(RUNTIME_DATA),
                    "workload_pcr_value": hx(base_values[WORKLOAD_PCR]),
                },
            }
        ],
        "negative": [
            {
                "name": name,
                "description": description,
                "policy": policy,
                "client": client_json(**client),
                "evidence": evidence_json(ev),
                "error": error,
            }
            for name, description, ev, policy, client, error in negatives
        ],
    }


# --- main -------------------------------------------------------------------------------------


# --- policies: the rules every client applies before it reads evidence -------------------

VECTOR_EPOCH = (2025, 1, 1)


def vector_certificate(
    label: str,
    subject: list[tuple[Any, str]],
    *,
    issuer: tuple[list[tuple[Any, str]], ec.EllipticCurvePrivateKey] | None = None,
    ca: bool = True,
    extensions: list[tuple[str, bytes]] = (),  # type: ignore[assignment]
    path_length: int | None = None,
    key_cert_sign: bool = True,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """A deterministic DER certificate (fixed key, serial, dates; RFC 6979 ECDSA). A CA
    certificate carries keyUsage keyCertSign+cRLSign (or digitalSignature only, without
    `key_cert_sign`), key identifiers and `path_length`."""
    import datetime

    from cryptography import x509

    key = key or ec_key(f"certificate {label}")
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in subject])
    issuer_name, issuer_key = (
        (name, key)
        if issuer is None
        else (
            x509.Name([x509.NameAttribute(oid, value) for oid, value in issuer[0]]),
            issuer[1],
        )
    )
    start = datetime.datetime(*VECTOR_EPOCH, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(seed(f"serial {label}", 8), "big") >> 1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365 * 30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if ca:
        usage = dict.fromkeys(
            (
                "digital_signature",
                "content_commitment",
                "key_encipherment",
                "data_encipherment",
                "key_agreement",
                "key_cert_sign",
                "crl_sign",
                "encipher_only",
                "decipher_only",
            ),
            False,
        )
        usage.update(
            {"key_cert_sign": key_cert_sign, "crl_sign": key_cert_sign}
            if key_cert_sign
            else {"digital_signature": True}
        )
        builder = builder.add_extension(x509.KeyUsage(**usage), critical=True)
    for oid, value in extensions:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256(), ecdsa_deterministic=True)
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(der: bytes) -> str:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _der_tlv(tag: int, body: bytes) -> bytes:
    assert len(body) < 0x10000
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    size = len(body).to_bytes(1 if len(body) < 0x100 else 2, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _der_int(value: int) -> bytes:
    return _der_tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def gce_identity_der(
    project_id: str, project_number: int, *, production: bool | None, extra: bytes = b""
) -> bytes:
    """`extra`: more security properties after [1] and a field after them, as Google may add."""
    body = (
        _der_tlv(0x0C, b"europe-west4-a")
        + _der_int(project_number)
        + _der_tlv(0x0C, project_id.encode())
        + _der_int(4242424242424242424)
        + _der_tlv(0x0C, b"encloud-cvm-1")
    )
    if production is not None:
        props = _der_tlv(0xA0, _der_int(1)) + _der_tlv(
            0xA1, _der_tlv(0x01, b"\xff" if production else b"\x00")
        )
        body += _der_tlv(0xA0, _der_tlv(0x30, props + extra))
        body += extra and _der_tlv(0x0C, b"a later field")
    return _der_tlv(0x30, body)


def policy_vectors() -> dict[str, Any]:
    from cryptography.x509.oid import NameOID

    from encloud.protocol.errors import PolicyError, PolicyIncompleteError
    from encloud.protocol.policy import BOOT_PCRS, parse_policy
    from encloud.protocol.verifier import check_gce_identity

    o, cn = NameOID.ORGANIZATION_NAME, NameOID.COMMON_NAME
    google = [(o, "Google LLC"), (cn, "EK/AK CA Root")]
    certificates = {
        "google_root": vector_certificate("google root", google),
        "vendor_root": vector_certificate(
            "vendor root", [(o, "Example TPM Vendor"), (cn, "AK CA")]
        ),
        "amd_ark": vector_certificate(
            "amd ark", [(o, "Advanced Micro Devices"), (cn, "ARK-Milan")]
        ),
        "test_ark": vector_certificate("test ark", [(o, "encloud TEST"), (cn, "ARK-Test")]),
    }
    pem = {name: _pem(der) for name, der in certificates.items()}
    selection = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14, 15]

    def base(**changes: Any) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "version": 1,
            "dev_only": False,
            "pcr_bank": "sha256",
            "pcr_selection": selection,
            "pcr_values": {str(i): hx(pcr_value(i)) for i in selection if i != 15},
            "workload_pcr": 15,
            "allowed_model_digests": [hx(MODEL_DIGEST)],
            "allowed_runtime_events": [hx(sha256(RUNTIME_DATA))],
            "ak": {"pinned_public_keys": [base64.b64encode(spki(AK)).decode("ascii")]},
            "max_session_ttl_seconds": 3600,
        }
        obj.update(changes)
        return obj

    def platform(kind: str = "sev-snp", **changes: Any) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "kind": kind,
            "production": True,
            "amd_roots": [pem["amd_ark"]],
            "measurements": [hx(seed("launch measurement", 48))],
            "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
            "vmpl": 0,
        }
        obj.update(changes)
        return {k: v for k, v in obj.items() if v is not None}

    google_ak = {"certificate_roots": [pem["google_root"]], "gce": {"project_id": "encloud-prod"}}
    unpinned_boot = {k: v for k, v in base()["pcr_values"].items() if int(k) not in BOOT_PCRS}
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("dev_pinned", "a dev policy pinning the AK", base(), "complete"),
        (
            "dev_vendor_root",
            "a dev policy trusting a vendor AK CA",
            base(ak={"certificate_roots": [pem["vendor_root"]]}),
            "complete",
        ),
        ("no_ak_trust", "neither a pin nor a root", base(ak={}), "incomplete"),
        (
            "google_root_without_project",
            "Google's CA certifies every customer",
            base(ak={"certificate_roots": [pem["google_root"]]}),
            "incomplete",
        ),
        (
            "google_root_with_project",
            "Google's CA and the project pin",
            base(ak=google_ak),
            "complete",
        ),
        (
            "gce_pin_without_project",
            "a GCE pin must name the project",
            base(ak={"certificate_roots": [pem["google_root"]], "gce": {"instance_id": "7"}}),
            "invalid",
        ),
        (
            "gce_pin_unknown_key",
            "unknown key in the GCE pin",
            base(ak={**google_ak, "gce": {"project_id": "p", "region": "x"}}),
            "invalid",
        ),
        (
            "gce_pin_number_as_json_integer",
            "ids are decimal strings, exact in every language",
            base(ak={**google_ak, "gce": {"project_number": 123456789012}}),
            "invalid",
        ),
        (
            "production_gcp_complete",
            "GCP: Google's CA + project, AMD ARK, all pins",
            base(ak=google_ak, platform=platform()),
            "complete",
        ),
        (
            "production_azure_complete",
            "Azure: the VMPL-0 HCL report carries the AK",
            base(ak={}, platform=platform("azure-sev-snp")),
            "complete",
        ),
        (
            "production_azure_without_vmpl",
            "production needs vmpl stated",
            base(ak={}, platform=platform("azure-sev-snp", vmpl=None)),
            "incomplete",
        ),
        (
            "azure_vmpl_1",
            "Azure's AK binding holds only at VMPL 0",
            base(ak={}, platform=platform("azure-sev-snp", production=False, vmpl=1)),
            "invalid",
        ),
        (
            "production_bare",
            "a production platform on a policy that states nothing else",
            base(ak={}, pcr_values={}, platform={"kind": "sev-snp", "production": True}),
            "incomplete",
        ),
        (
            "production_no_boot_pins",
            "boot PCRs unpinned",
            base(pcr_values=unpinned_boot, platform=platform()),
            "incomplete",
        ),
        (
            "production_boot_pcr_not_selected",
            "boot PCRs not even quoted",
            base(
                pcr_selection=[0, 1, 2, 3, 4, 5, 6, 7, 15],
                pcr_values={str(i): hx(pcr_value(i)) for i in range(8)},
                platform=platform(),
            ),
            "incomplete",
        ),
        (
            "production_unpinned_pcr_5",
            "a non-boot PCR neither pinned nor waived",
            base(
                pcr_values={k: v for k, v in base()["pcr_values"].items() if k != "5"},
                platform=platform(),
            ),
            "incomplete",
        ),
        (
            "production_waived_pcr_5",
            "a non-boot PCR waived with its reason",
            base(
                pcr_values={k: v for k, v in base()["pcr_values"].items() if k != "5"},
                pcr_waivers={"5": "GPT differs per disk size"},
                platform=platform(),
            ),
            "complete",
        ),
        (
            "waiver_of_pcr_4",
            "a boot PCR is never waived",
            base(
                pcr_values={k: v for k, v in base()["pcr_values"].items() if k != "4"},
                pcr_waivers={"4": "boot loader updates"},
                platform=platform(),
            ),
            "invalid",
        ),
        (
            "waiver_without_reason",
            "a waiver gives its reason",
            base(
                pcr_values={k: v for k, v in base()["pcr_values"].items() if k != "5"},
                pcr_waivers={"5": " "},
            ),
            "invalid",
        ),
        (
            "production_test_root",
            "a test root is not an AMD ARK",
            base(platform=platform(amd_roots=[pem["test_ark"]])),
            "incomplete",
        ),
        (
            "production_dev_only",
            "a production policy is not trust on first use",
            base(dev_only=True, platform=platform()),
            "incomplete",
        ),
        (
            "production_partial_min_tcb",
            "min_tcb names all four components",
            base(platform=platform(min_tcb={"snp": 8})),
            "invalid",
        ),
        (
            "dev_platform_without_roots",
            "a platform needs an AMD root",
            base(platform=platform(production=False, amd_roots=[])),
            "incomplete",
        ),
        (
            "hybrid_only",
            "only the post-quantum suite: no fallback",
            base(hpke_suites=["mlkem768-x25519"]),
            "complete",
        ),
        (
            "unknown_suite",
            "a suite name neither client knows",
            base(hpke_suites=["x448"]),
            "invalid",
        ),
        ("empty_suites", "an empty suite list accepts nothing", base(hpke_suites=[]), "invalid"),
        (
            "azure_without_measurement_is_no_ak_trust",
            "VMPL 0 means the paravisor only when its measurement is pinned",
            base(ak={}, platform=platform("azure-sev-snp", production=False, measurements=[])),
            "incomplete",
        ),
    ]
    policies = []
    for name, description, obj, intent in cases:
        text = json.dumps(obj, sort_keys=True)
        entry: dict[str, Any] = {"name": name, "description": description, "policy": text}
        try:
            parse_policy(text.encode())
            entry["expect"] = "complete"
        except PolicyIncompleteError as err:
            entry["expect"], entry["gaps"] = "incomplete", err.gaps
        except PolicyError as err:
            entry["expect"], entry["error"] = "invalid", str(err)
            entry["field"] = str(err).split("'")[1]
        assert entry["expect"] == intent, (name, entry)
        policies.append(entry)

    # The GCE identity in an AK certificate against a policy's ak.gce pin (check 2).
    ca_key = ec_key("certificate gce intermediate")
    ca_name = [(o, "Google LLC"), (cn, "EK/AK CA Intermediate")]

    def leaf(label: str, identity: bytes | None) -> bytes:
        ext = [("1.3.6.1.4.1.11129.2.1.21", identity)] if identity is not None else []
        return vector_certificate(
            f"gce leaf {label}", [(cn, "AK")], issuer=(ca_name, ca_key), ca=False, extensions=ext
        )

    ours = leaf("ours", gce_identity_der("encloud-prod", 123456789012, production=True))
    identity_cases = [
        ("project_matches", ours, {"project_id": "encloud-prod"}, True),
        (
            "project_and_instance_match",
            ours,
            {
                "project_number": "123456789012",
                "instance_id": "4242424242424242424",
                "instance_name": "encloud-cvm-1",
            },
            True,
        ),
        (
            "another_project",
            leaf("theirs", gce_identity_der("attacker", 7, production=True)),
            {"project_id": "encloud-prod"},
            False,
        ),
        ("another_instance", ours, {"project_id": "encloud-prod", "instance_id": "1"}, False),
        (
            "not_production",
            leaf("dev", gce_identity_der("encloud-prod", 123456789012, production=False)),
            {"project_id": "encloud-prod"},
            False,
        ),
        (
            "no_security_properties",
            leaf("bare", gce_identity_der("encloud-prod", 123456789012, production=None)),
            {"project_id": "encloud-prod"},
            False,
        ),
        ("no_identity_but_pinned", leaf("none", None), {"project_id": "encloud-prod"}, False),
        ("identity_but_no_pin", ours, None, False),
        ("no_identity_no_pin", leaf("none", None), None, True),
        ("malformed_identity", leaf("junk", b"\x30\x03\x0c\x05a"), {"project_id": "p"}, False),
        (
            "later_security_properties_are_skipped",
            leaf(
                "later",
                gce_identity_der(
                    "encloud-prod",
                    123456789012,
                    production=True,
                    extra=_der_tlv(0xA2, _der_tlv(0x01, b"\xff")),
                ),
            ),
            {"project_id": "encloud-prod"},
            True,
        ),
        (
            "a_malformed_later_property_is_refused",
            leaf(
                "broken",
                gce_identity_der(
                    "encloud-prod", 123456789012, production=True, extra=b"\xa2\x05\x01\x01"
                ),
            ),
            {"project_id": "encloud-prod"},
            False,
        ),
    ]
    identities = []
    from encloud.protocol.errors import AkUntrustedError
    from encloud.protocol.policy import gce_pin_from_obj

    for name, der, pin, passes in identity_cases:
        try:
            check_gce_identity(der, gce_pin_from_obj(pin) if pin is not None else None)
            ok = True
        except AkUntrustedError:
            ok = False
        assert ok == passes, name
        identities.append(
            {
                "name": name,
                "leaf": hx(der),
                "pin": pin,
                "expect": "ok" if ok else "AkUntrustedError",
            }
        )
    # AK certificate chains (check 2): path validation as both clients do it.
    ak_key = ec_key("chain ak")
    root_name = [(o, "Example vTPM Vendor"), (cn, "Example Root")]
    google_name = [(o, "Google LLC"), (cn, "EK/AK CA Intermediate")]

    def ca(label: str, subject: list[Any], issuer: tuple[list[Any], Any] | None, **kw: Any):
        der = vector_certificate(label, subject, issuer=issuer, **kw)
        return der, ec_key(f"certificate {label}")

    root_der, root_key = ca("chain root", root_name, None, path_length=1)
    tight_der, tight_key = ca("chain tight root", root_name, None, path_length=0)

    def leaf_under(label: str, issuer_name: list[Any]) -> bytes:
        issuer_key = ec_key(f"certificate {label} issuer")
        return vector_certificate(
            f"{label} leaf",
            [(cn, "AK")],
            issuer=(issuer_name, issuer_key),
            ca=False,
            key=ak_key,
        )

    def chain_case(label: str, signer: Any, name: list[Any] | None = None, **kw: Any):
        subject = name or [(o, "Example vTPM Vendor"), (cn, f"Intermediate {label}")]
        issuer_key = ec_key(f"certificate {label} issuer")
        middle = vector_certificate(
            f"{label} issuer", subject, issuer=(root_name, signer), key=issuer_key, **kw
        )
        return (leaf_under(label, subject), middle)

    chain_cases = [
        ("valid", chain_case("valid", root_key), root_der, False, True),
        (
            "ca_without_key_cert_sign",
            chain_case("nosign", root_key, key_cert_sign=False),
            root_der,
            False,
            False,
        ),
        ("longer_than_path_length", chain_case("tight", tight_key), tight_der, False, False),
        (
            "via_google_without_a_gce_pin",
            chain_case("google", root_key, google_name),
            root_der,
            False,
            False,
        ),
        (
            "via_google_with_a_gce_pin",
            chain_case("google", root_key, google_name),
            root_der,
            True,
            True,
        ),
        ("to_another_root", chain_case("valid", root_key), tight_der, False, False),
    ]
    from encloud.protocol.verifier import check_certificate_chain

    ak_spki = spki(ak_key)
    chains = []
    for name, chain, root, pinned, passes in chain_cases:
        try:
            check_certificate_chain(chain, (root,), ak_spki, pinned)
            ok = True
        except AkUntrustedError:
            ok = False
        assert ok == passes, name
        chains.append(
            {
                "name": name,
                "chain": [hx(c) for c in chain],
                "root": _pem(root),
                "ak_spki": hx(ak_spki),
                "gce_pinned": pinned,
                "expect": "ok" if ok else "AkUntrustedError",
            }
        )
    return {
        "description": "policy completeness (parse_policy; docs/PROTOCOL.md, 'Complete policies') "
        "and the GCE identity check of ak_trust. expect: complete (a client that does not "
        "implement the policy's platform section refuses it instead), incomplete (exactly "
        "these gap lines, in order), invalid (a PolicyError naming the field).",
        "certificates": pem,
        "policies": policies,
        "gce_identity": identities,
        "chains": chains,
    }


# --- the audit log ---------------------------------------------------------------------------


def audit_vectors() -> dict[str, Any]:
    """A small audit log and its checkpoints, built by hand from the format (fixed log id,
    times and Ed25519 key: Ed25519 signatures are deterministic), then verified by the
    reference; and the faults its verifier must name."""
    import base64 as b64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from encloud.protocol.audit import (
        GENESIS,
        attestation_entry,
        canonical,
        checkpoint_message,
    )

    key = Ed25519PrivateKey.from_private_bytes(seed("audit checkpoint key"))
    log_id = seed("audit log id", 16)
    start = 1_767_225_600  # 2026-01-01T00:00:00Z
    entries: list[dict[str, Any]] = [
        {"event": "log_start", "log_id": log_id.hex(), "seq": 0, "time": start}
    ]
    for i, outcome in enumerate(("pass", "fail", "pass")):
        entry = attestation_entry(
            server="cvm.example:50051",
            nonce=seed(f"audit nonce {i}"),
            quote_attest=seed(f"audit quote {i}", 64),
            policy_digest=seed("audit policy"),
            ak_fingerprint=seed("audit ak").hex() if outcome == "pass" else None,
            model_digest=MODEL_DIGEST if outcome == "pass" else None,
            failed_check=None if outcome == "pass" else "pcr_value",
        )
        entries.append({**entry, "seq": i + 1, "time": start + 60 * (i + 1)})
    lines: list[bytes] = []
    prev = GENESIS
    for entry in entries:
        line = canonical({**entry, "prev": prev.hex()})
        lines.append(line)
        prev = sha256(line)

    def checkpoint(seq: int, stamp: int) -> bytes:
        head = sha256(lines[seq])
        signature = key.sign(checkpoint_message(log_id, seq, head, stamp))
        return canonical(
            {
                "log_id": log_id.hex(),
                "seq": seq,
                "head": head.hex(),
                "time": stamp,
                "signature": b64.b64encode(signature).decode("ascii"),
            }
        )

    checkpoints = [checkpoint(1, start + 61), checkpoint(2, start + 121)]
    edited = list(lines)
    edited[2] = edited[2].replace(b'"outcome":"fail"', b'"outcome":"pass"')
    text = lambda ls: b"".join(line + b"\n" for line in ls).decode("utf-8")  # noqa: E731
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "description": "an audit log (entries 0..3) with two signed checkpoints, and faults; "
        "docs/PROTOCOL.md, 'The audit log'",
        "checkpoint_public_key": public.decode("ascii"),
        "checkpoint_messages": [
            hx(checkpoint_message(log_id, seq, sha256(lines[seq]), stamp))
            for seq, stamp in ((1, start + 61), (2, start + 121))
        ],
        "log": text(lines),
        "checkpoints": text(checkpoints),
        "expect": {"entries": 4, "anchored_through": 2, "checkpoints": 2},
        "negative": [
            {
                "name": "edited_entry",
                "description": "entry 2's outcome changed after it was written",
                "log": text(edited),
                "checkpoints": text(checkpoints),
                "error_seq": 2,
            },
            {
                "name": "cut_off_tail",
                "description": "entries 2 and 3 removed: the checkpoint of entry 2 shows it",
                "log": text(lines[:2]),
                "checkpoints": text(checkpoints),
                "error_seq": None,
            },
            {
                "name": "forged_checkpoint",
                "description": "a checkpoint whose signature is not the key's",
                "log": text(lines),
                "checkpoints": text([checkpoints[0].replace(b'"time":', b'"time":1', 1)]),
                "error_seq": None,
            },
        ],
    }


def build() -> dict[str, str]:
    """Every vector file's exact text, by file stem."""
    handshake, keys = handshake_vectors()
    docs = {
        "encoding": encoding_vectors(),
        "handshake": handshake,
        "envelope": envelope_vectors(keys),
        "stream": stream_vectors(keys),
        "embed": embed_vectors(keys),
        "sealed_file": sealed_file_vectors(),
        "sentinel": sentinel_vectors(),
        "jobs": job_vectors(),
        "eventlog": eventlog_vectors(),
        "evidence": evidence_vectors(),
        "policy": policy_vectors(),
        "audit": audit_vectors(),
    }
    assert tuple(docs) == FILES
    return {
        name: json.dumps({"version": 2, **doc}, indent=1, sort_keys=True, ensure_ascii=True) + "\n"
        for name, doc in docs.items()
    }


def main(argv: list[str]) -> int:
    texts = build()
    if "--check" in argv:
        stale = [n for n, t in texts.items() if (HERE / f"{n}.json").read_text() != t]
        for name in stale:
            print(f"tests/vectors/{name}.json is stale", file=sys.stderr)
        return 1 if stale else 0
    for name, text in texts.items():
        (HERE / f"{name}.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
