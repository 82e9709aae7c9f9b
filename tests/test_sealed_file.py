"""Sealed files (protocol/sealed_file.py): Tink opens ours and we open Tink's, at every
segment boundary; files of several 1 MiB segments attacked one way per test, each expecting
its typed error; bounded memory on a large file; `encloud seal` / `encloud open` as users run
them; the Node client's `open` on a file Python sealed."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from encloud.protocol import sealed_file as sf
from encloud.protocol.sealed_file import (
    SealedFileDecryptError,
    SealedFileFormatError,
    SealedFileKeyIdError,
)

pytestmark = pytest.mark.sealed

ENCLOUD = str(Path(sys.executable).with_name("encloud"))
KEY = bytes(range(32))
KEY_ID = "owner-1/dataset-7"
FIRST = sf.SEGMENT_SIZE - sf.TINK_HEADER_LENGTH - sf.TAG_LENGTH  # plaintext of segment 0
FULL = sf.SEGMENT_SIZE - sf.TAG_LENGTH  # plaintext of every other segment
SIZES = [0, 1, FIRST - 1, FIRST, FIRST + 1, FIRST + FULL, FIRST + FULL + 7]


def seal(data: bytes, key: bytes = KEY, key_id: str = KEY_ID) -> bytes:
    out = io.BytesIO()
    sf.seal_stream(io.BytesIO(data), out, key, key_id)
    return out.getvalue()


def open_(blob: bytes, key: bytes = KEY, **kw: str) -> bytes:
    out = io.BytesIO()
    sf.open_stream(io.BytesIO(blob), out, key, **kw)
    return out.getvalue()


def segments(blob: bytes, key_id: str = KEY_ID) -> tuple[bytes, list[bytes]]:
    """(both headers, the ciphertext segments) of a sealed file."""
    start = len(sf.SealedHeader(key_id).encode()) + sf.TINK_HEADER_LENGTH
    head, rest = blob[:start], blob[start:]
    first = sf.SEGMENT_SIZE - sf.TINK_HEADER_LENGTH
    parts = [rest[:first]]
    parts += [rest[i : i + sf.SEGMENT_SIZE] for i in range(first, len(rest), sf.SEGMENT_SIZE)]
    return head, parts


@pytest.fixture(scope="module")
def three() -> tuple[bytes, bytes]:
    """A plaintext of three segments and its sealed file."""
    data = os.urandom(FIRST + FULL + 1000)
    return data, seal(data)


# --- Tink -------------------------------------------------------------------------------------


def _tink(key: bytes):  # type: ignore[no-untyped-def]
    """A Tink StreamingAead holding `key` as an AES256_GCM_HKDF_1MB key."""
    import tink
    from tink import secret_key_access, streaming_aead
    from tink.proto import aes_gcm_hkdf_streaming_pb2 as pb
    from tink.proto import common_pb2, tink_pb2

    streaming_aead.register()
    params = pb.AesGcmHkdfStreamingParams(
        ciphertext_segment_size=sf.SEGMENT_SIZE,
        derived_key_size=32,
        hkdf_hash_type=common_pb2.SHA256,
    )
    key_data = tink_pb2.KeyData(
        type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
        value=pb.AesGcmHkdfStreamingKey(
            version=0, key_value=key, params=params
        ).SerializeToString(),
        key_material_type=tink_pb2.KeyData.SYMMETRIC,
    )
    keyset = tink_pb2.Keyset(
        primary_key_id=1,
        key=[
            tink_pb2.Keyset.Key(
                key_data=key_data,
                status=tink_pb2.ENABLED,
                key_id=1,
                output_prefix_type=tink_pb2.RAW,
            )
        ],
    )
    handle = tink.proto_keyset_format.parse(keyset.SerializeToString(), secret_key_access.TOKEN)
    return handle.primitive(streaming_aead.StreamingAead)


class _Kept(io.BytesIO):
    def close(self) -> None:  # Tink closes the stream it wrote; keep the bytes readable
        pass


@pytest.mark.parametrize("size", SIZES)
def test_tink_opens_ours_and_we_open_tinks(size: int) -> None:
    data = os.urandom(size)
    header = sf.SealedHeader(KEY_ID).encode()
    aead = _tink(KEY)
    ours = seal(data)
    with aead.new_decrypting_stream(io.BytesIO(ours[len(header) :]), header) as stream:
        assert stream.read() == data
    theirs = _Kept()
    with aead.new_encrypting_stream(theirs, header) as stream:
        stream.write(data)
    assert open_(header + theirs.getvalue()) == data
    assert len(header + theirs.getvalue()) == len(ours)  # the same segmentation


def test_tink_refuses_ours_under_another_key_id() -> None:
    """The key id is Tink's associated data: a file renamed to another key id opens nowhere."""
    import tink

    ours = seal(b"payroll")
    other = sf.SealedHeader("owner-1/other").encode()
    body = ours[len(sf.SealedHeader(KEY_ID).encode()) :]
    with (
        pytest.raises(tink.TinkError),
        _tink(KEY).new_decrypting_stream(io.BytesIO(body), other) as stream,
    ):
        stream.read()


# --- attacks on files of several segments -----------------------------------------------------


@pytest.mark.attack
@pytest.mark.broker  # the file attacks of Sentinel's suite too (docs/SENTINEL.md)
def test_three_segments_open(three) -> None:
    data, blob = three
    assert len(segments(blob)[1]) == 3
    assert open_(blob) == data


@pytest.mark.attack
@pytest.mark.broker  # the file attacks of Sentinel's suite too (docs/SENTINEL.md)
def test_reordered_segments_are_refused(three) -> None:
    head, parts = segments(three[1])
    swapped = head + parts[1] + parts[0][: len(parts[1])] + parts[2]
    with pytest.raises(SealedFileDecryptError):
        open_(swapped)


@pytest.mark.attack
@pytest.mark.broker  # the file attacks of Sentinel's suite too (docs/SENTINEL.md)
def test_a_dropped_middle_segment_is_refused(three) -> None:
    head, parts = segments(three[1])
    with pytest.raises(SealedFileDecryptError):
        open_(head + parts[0] + parts[2])


@pytest.mark.attack
@pytest.mark.broker  # the file attacks of Sentinel's suite too (docs/SENTINEL.md)
def test_a_file_truncated_at_a_segment_boundary_is_refused(three) -> None:
    head, parts = segments(three[1])
    with pytest.raises(SealedFileDecryptError, match="segment 1"):
        open_(head + parts[0] + parts[1])


@pytest.mark.attack
@pytest.mark.broker  # the file attacks of Sentinel's suite too (docs/SENTINEL.md)
def test_a_segment_spliced_from_another_file_is_refused(three) -> None:
    data, blob = three
    head, parts = segments(blob)
    _, others = segments(seal(data))  # the same plaintext and key, another salt
    with pytest.raises(SealedFileDecryptError, match="segment 1"):
        open_(head + parts[0] + others[1] + parts[2])


@pytest.mark.attack
@pytest.mark.broker  # the file attacks of Sentinel's suite too (docs/SENTINEL.md)
def test_a_whole_other_files_body_under_this_header_is_refused(three) -> None:
    data, blob = three
    head, _ = segments(blob)
    _, others = segments(seal(data, key_id="owner-2/x"), key_id="owner-2/x")
    with pytest.raises(SealedFileDecryptError):
        open_(head + b"".join(others))


@pytest.mark.attack
@pytest.mark.broker  # the file attacks of Sentinel's suite too (docs/SENTINEL.md)
def test_bytes_appended_are_refused(three) -> None:
    with pytest.raises(SealedFileDecryptError):
        open_(three[1] + b"\x00" * 16)


@pytest.mark.attack
@pytest.mark.broker  # the file attacks of Sentinel's suite too (docs/SENTINEL.md)
def test_a_file_sealed_under_another_key_id_is_refused_by_name() -> None:
    blob = seal(b"x", key_id="owner-2/files")
    with pytest.raises(SealedFileKeyIdError, match="owner-2/files"):
        open_(blob, expected_key_id=KEY_ID)


@pytest.mark.attack
@pytest.mark.broker  # the file attacks of Sentinel's suite too (docs/SENTINEL.md)
def test_another_key_is_refused() -> None:
    with pytest.raises(SealedFileDecryptError):
        open_(seal(b"x"), key=bytes(32))


def test_not_a_sealed_file_is_a_format_error() -> None:
    for blob in (b"", b"hello world, plainly", b"ENCLSEAL\x02\x01k" + bytes(60)):
        with pytest.raises(SealedFileFormatError):
            open_(blob)


def test_key_ids_and_key_files() -> None:
    for bad in ("", "a b", "é", "x" * 129):
        with pytest.raises(ValueError):
            sf.check_key_id(bad)
    assert sf.read_key_file(KEY) == KEY
    assert sf.read_key_file(KEY.hex().encode() + b"\n") == KEY
    with pytest.raises(ValueError):
        sf.read_key_file(b"too short")
    with pytest.raises(ValueError, match="64 hex digits"):
        sf.read_key_file(os.urandom(16).hex().encode())  # a 128-bit hex key is not 32 raw bytes


# --- bounded memory ---------------------------------------------------------------------------


class _Pattern(io.RawIOBase):
    """`size` bytes of a repeating pattern, produced as they are read (never held whole)."""

    def __init__(self, size: int) -> None:
        self._left = size
        self._block = bytes(range(256)) * 256

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buffer), self._left, len(self._block))
        buffer[:n] = self._block[:n]
        self._left -= n
        return n


class _Sink(io.RawIOBase):
    """Counts what is written and keeps the last bytes, nothing more."""

    def __init__(self) -> None:
        self.size = 0
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[no-untyped-def]
        self.size += len(data)
        self.chunks = [bytes(data)]
        return len(data)


def test_a_64_mib_file_seals_and_opens_in_bounded_memory(tmp_path: Path) -> None:
    size = 64 << 20
    sealed_path = tmp_path / "big.sealed"
    tracemalloc.start()
    try:
        with sealed_path.open("wb") as sink:
            assert sf.seal_stream(io.BufferedReader(_Pattern(size)), sink, KEY, KEY_ID) == size
        sealing_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        sink2 = _Sink()
        with sealed_path.open("rb") as source:
            sf.open_stream(source, sink2, KEY)
        opening_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sink2.size == size
    # About two segments in flight, whatever the file's size (64 segments here).
    assert sealing_peak < 5 * sf.SEGMENT_SIZE, sealing_peak
    assert opening_peak < 5 * sf.SEGMENT_SIZE, opening_peak


# --- the CLI ----------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ENCLOUD, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def test_encloud_seal_then_open(tmp_path: Path, three) -> None:
    data = three[0]
    (tmp_path / "in.bin").write_bytes(data)
    done = _cli(
        "seal", "in.bin", "-o", "in.sealed", "--key-id", KEY_ID, "--new-key", "k.hex", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "k.hex").stat().st_mode & 0o777 == 0o600
    assert data[:4096] not in (tmp_path / "in.sealed").read_bytes()
    done = _cli(
        "open", "in.sealed", "-o", "out.bin", "--key", "k.hex", "--key-id", KEY_ID, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.bin").read_bytes() == data
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o600  # plaintext at rest: private
    key = sf.read_key_file((tmp_path / "k.hex").read_bytes())
    assert open_((tmp_path / "in.sealed").read_bytes(), key=key) == data


def test_encloud_open_of_a_tampered_file_writes_nothing(tmp_path: Path, three) -> None:
    head, parts = segments(three[1])
    (tmp_path / "cut.sealed").write_bytes(head + parts[0] + parts[1])  # truncated
    (tmp_path / "k.bin").write_bytes(KEY)
    done = _cli("open", "cut.sealed", "-o", "out.bin", "--key", "k.bin", cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "SealedFileDecryptError" in lines[0]
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.sealed", "k.bin"]


def test_encloud_seal_mistakes_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "in.bin").write_bytes(b"x")
    (tmp_path / "short.key").write_bytes(b"abc")
    cases = [
        (("seal", "in.bin", "-o", "o", "--key-id", "a b", "--key", "short.key"), 2, "key id"),
        (("seal", "in.bin", "-o", "o", "--key-id", "k", "--key", "short.key"), 2, "key file"),
        (("seal", "missing", "-o", "o", "--key-id", "k", "--new-key", "n.key"), 1, "missing"),
        (("open", "in.bin", "-o", "o", "--key", "short.key"), 2, "key file"),
    ]
    for args, code, wanted in cases:
        done = _cli(*args, cwd=tmp_path)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == code and len(lines) == 1 and wanted in lines[0], done.stderr


# --- the Node client --------------------------------------------------------------------------


@pytest.mark.interop
def test_the_node_client_opens_a_file_python_sealed(
    tmp_path: Path, three, node_client: str
) -> None:
    from conftest import NODE_DIR

    data, blob = three
    (tmp_path / "f.sealed").write_bytes(blob)
    (tmp_path / "k.hex").write_text(KEY.hex() + "\n")
    args = [
        node_client,
        "bin/encloud-node.js",
        "open",
        str(tmp_path / "f.sealed"),
        "-o",
        str(tmp_path / "out"),
        "--key",
        str(tmp_path / "k.hex"),
        "--key-id",
        KEY_ID,
    ]
    done = subprocess.run(args, cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out").read_bytes() == data
    head, parts = segments(blob)
    (tmp_path / "f.sealed").write_bytes(head + parts[0] + parts[2])  # a segment dropped
    (tmp_path / "out").unlink()
    done = subprocess.run(args, cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "SealedFileDecryptError" in done.stderr
    assert not (tmp_path / "out").exists()
