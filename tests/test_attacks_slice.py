"""The first attacks on the slice, each expecting its typed error.

The full attack suite is tests/test_attacks*.py; these are the three the first
end-to-end slice must already refuse: a stale quote, a frame replayed from
another request, and a stream cut before its final frame.
"""

from __future__ import annotations

import pytest

from encloud.protocol.errors import (
    DecryptError,
    HeaderMismatchError,
    NonceMismatchError,
    TruncatedStreamError,
)
from encloud.protocol.v2 import encloud_pb2 as pb

pytestmark = [pytest.mark.e2e, pytest.mark.attack]

ASK = [("user", "Count from one to five.")]


def test_replayed_quote_with_old_nonce_is_refused(connect, wire) -> None:
    client = connect()
    client.attest()
    old_reply = wire.received_of("Attest")[0]

    wire.tamper = lambda method, msg, _: old_reply if method.endswith("Attest") else msg
    with pytest.raises(NonceMismatchError):
        client.attest()


def _frame_from_first_stream(client, wire) -> pb.SealedMessage:
    list(client.stream(ASK, max_new_tokens=8))
    return wire.received_of("StreamInfer")[0].frame


def test_frame_replayed_from_another_request_is_refused(connect, wire) -> None:
    client = connect()
    client.attest()
    client.release_key()
    replayed = _frame_from_first_stream(client, wire)

    def swap_first_frame(method, msg, index):
        if method.endswith("StreamInfer") and index == 0:
            # Relabel the old frame with this request's header: only the tag can tell.
            forged = pb.SealedMessage()
            forged.CopyFrom(replayed)
            forged.request_id = msg.frame.request_id
            return pb.StreamInferResponse(frame=forged)
        return msg

    wire.tamper = swap_first_frame
    with pytest.raises(DecryptError):
        list(client.stream(ASK, max_new_tokens=8))


def test_frame_replayed_with_its_own_header_is_refused(connect, wire) -> None:
    client = connect()
    client.attest()
    client.release_key()
    replayed = _frame_from_first_stream(client, wire)

    def swap_first_frame(method, msg, index):
        if method.endswith("StreamInfer") and index == 0:
            return pb.StreamInferResponse(frame=replayed)
        return msg

    wire.tamper = swap_first_frame
    with pytest.raises(HeaderMismatchError):
        list(client.stream(ASK, max_new_tokens=8))


def test_stream_cut_before_final_frame_is_refused(connect, wire) -> None:
    client = connect()
    client.attest()
    client.release_key()

    def drop_final(method, msg, _):
        if method.endswith("StreamInfer") and msg.frame.type == pb.MESSAGE_TYPE_FINAL:
            return None
        return msg

    wire.tamper = drop_final
    stream = client.stream(ASK, max_new_tokens=8)
    with pytest.raises(TruncatedStreamError):
        list(stream)
    assert stream.completion is None
