"""The served embedding model (all-MiniLM-L6-v2 exported to ONNX, embedder.py) against vectors
computed from the original safetensors with torch (tests/data/embeddings_reference.json,
scripts/embeddings_reference.py), a retrieval check (tests/data/embeddings_retrieval.json), the
request semantics, batching across concurrent callers, and the folder's integrity.

The export is cached under $ENCLOUD_CACHE_ROOT (~6 s the first time, then a verification).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import cache_root

from encloud.protocol.faults import InvalidArgumentError, UnavailableError
from encloud.server.inference.embedder import Embedder
from encloud.server.inference.embeddings_export import export_embeddings_model
from encloud.server.inference.manifest import ModelIntegrityError

pytestmark = pytest.mark.embeddings

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "embeddings_reference.json").read_text(encoding="utf-8"))
RETRIEVAL = json.loads((DATA / "embeddings_retrieval.json").read_text(encoding="utf-8"))
LONG = max(REFERENCE["sentences"], key=len)


@pytest.fixture(scope="module")
def folder(embeddings_model_dir: Path) -> Path:
    return embeddings_model_dir


@pytest.fixture(scope="module")
def embedder(folder: Path) -> Iterator[Embedder]:
    loaded = Embedder.load(folder, threads=2)
    yield loaded
    loaded.close()


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_served_vectors_match_the_torch_reference(embedder: Embedder) -> None:
    assert embedder.manifest.source["source_sha256"] == REFERENCE["source_sha256"]
    got = embedder.embed(REFERENCE["sentences"])
    ref = np.asarray(REFERENCE["vectors"], dtype=np.float64)
    cosines = (got.vectors * _unit(ref)).sum(axis=1)
    assert cosines.min() >= 0.999, dict(zip(REFERENCE["sentences"], cosines.round(6), strict=True))
    # The tokeniser agrees with transformers' too, truncation included.
    assert got.token_counts == REFERENCE["token_counts"]


def test_each_query_finds_its_document_first(embedder: Embedder) -> None:
    docs = embedder.embed(RETRIEVAL["documents"]).vectors
    assert docs.shape == (50, embedder.dimension)
    queries = RETRIEVAL["queries"]
    scores = embedder.embed([q["text"] for q in queries]).vectors @ docs.T
    ranked = scores.argmax(axis=1).tolist()
    assert ranked == [q["answer"] for q in queries]


def test_dimensions_are_cut_before_normalising(embedder: Embedder) -> None:
    texts = REFERENCE["sentences"][:4]
    full = embedder.embed(texts, normalize=False).vectors
    cut = embedder.embed(texts, dimensions=64)
    assert cut.vectors.shape == (4, 64)
    assert cut.vectors.dtype == np.float32 and cut.vectors.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(cut.vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(cut.vectors, _unit(full[:, :64]), atol=1e-6)
    # Not the first 64 components of the 384-dimensional unit vector.
    assert np.linalg.norm(embedder.embed(texts).vectors[:, :64], axis=1).max() < 0.99
    for bad in (0, embedder.dimension + 1, -1, True, 2.5):
        with pytest.raises(InvalidArgumentError):
            embedder.embed(texts, dimensions=bad)  # type: ignore[arg-type]


def test_unnormalised_is_the_mean_pool_in_the_same_direction(embedder: Embedder) -> None:
    texts = REFERENCE["sentences"]
    raw = embedder.embed(texts, normalize=False).vectors
    unit = embedder.embed(texts).vectors
    norms = np.linalg.norm(raw, axis=1)
    assert np.all(np.abs(norms - 1.0) > 1e-2), norms
    np.testing.assert_allclose(_unit(raw), unit, atol=1e-6)


def test_token_counts_and_truncation(embedder: Embedder) -> None:
    assert embedder.max_tokens == REFERENCE["max_tokens"] == 256
    assert embedder.dimension == 384
    counts = embedder.count_tokens(["", "hello world", LONG])
    assert counts[:2] == [2, 4]  # [CLS] and [SEP] included
    assert counts[2] > embedder.max_tokens + 50
    got = embedder.embed(["", "hello world", LONG])
    assert got.token_counts == [2, 4, embedder.max_tokens]
    # What lies past the limit is not read: a longer tail changes nothing.
    longer = embedder.embed([LONG + " And then the night came, and the harbour slept."])
    np.testing.assert_allclose(longer.vectors, got.vectors[2:], atol=1e-6)
    assert embedder.embed([]).vectors.shape == (0, 384)
    with pytest.raises(InvalidArgumentError):
        embedder.embed("a string, not a list of them")


def test_tokens_counted_once_are_cut_as_the_truncating_tokeniser_cuts(
    embedder: Embedder, folder: Path
) -> None:
    """The server tokenises each text once (tokenize), counts, then runs the ids
    (aembed_tokens): the same tokens and vectors as tokenising the text for the model."""
    texts = ["", "hello world", LONG]
    tokens = embedder.tokenize(texts)
    assert [len(ids) for ids in tokens] == embedder.count_tokens(texts)
    got = asyncio.run(embedder.aembed_tokens(tokens))
    want = embedder.embed(texts)
    assert got.token_counts == want.token_counts == [2, 4, embedder.max_tokens]
    np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-6)
    at_16 = Embedder.load(folder, threads=2, max_tokens=16)
    try:
        cut = asyncio.run(at_16.aembed_tokens(at_16.tokenize([LONG])))
        assert cut.token_counts == [16]
        np.testing.assert_allclose(cut.vectors, at_16.embed([LONG]).vectors, atol=1e-6)
    finally:
        at_16.close()


def test_concurrent_callers_are_batched_with_the_same_vectors(embedder: Embedder) -> None:
    texts = [s for s in REFERENCE["sentences"] + RETRIEVAL["documents"] if s][:32]
    requests = [
        ([t], {"dimensions": 128 if i % 3 == 0 else None, "normalize": i % 4 != 1})
        for i, t in enumerate(texts)
    ]
    alone = [embedder.embed(t, **kw) for t, kw in requests]

    async def all_at_once() -> list:
        return await asyncio.gather(*(embedder.aembed(t, **kw) for t, kw in requests))

    before = embedder.batches_run
    together = asyncio.run(all_at_once())
    runs = embedder.batches_run - before
    assert 1 <= runs < len(requests) // 2, f"{runs} session runs for {len(requests)} callers"
    for one, batched in zip(alone, together, strict=True):
        assert batched.vectors.shape == one.vectors.shape
        assert batched.token_counts == one.token_counts
        np.testing.assert_allclose(batched.vectors, one.vectors, atol=1e-5)


def test_a_cancelled_caller_does_not_stop_the_worker(embedder: Embedder) -> None:
    async def scenario() -> np.ndarray:
        doomed = asyncio.create_task(embedder.aembed([LONG] * 40))
        await asyncio.sleep(0)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return (await embedder.aembed(["still served"])).vectors

    got = asyncio.run(scenario())
    np.testing.assert_allclose(got, embedder.embed(["still served"]).vectors, atol=1e-5)


def test_closed_embedder_refuses_async_requests(folder: Path) -> None:
    own = Embedder.load(folder, max_batch_texts=4)
    assert len(own.embed(["a", "b", "c", "d", "e"]).vectors) == 5
    assert own.batches_run == 2  # five texts, four per run
    own.close()
    with pytest.raises(UnavailableError):
        asyncio.run(own.aembed(["too late"]))


def test_a_tampered_copy_is_refused(folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    onnx = copy / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx"):
        Embedder.load(copy)


def test_a_second_export_only_verifies(folder: Path) -> None:
    before = (folder / "model.onnx").stat().st_mtime_ns
    said: list[str] = []
    again = export_embeddings_model(cache_root(), progress=said.append)
    assert again == folder
    assert any("cache hit" in m for m in said), said
    assert not any("exporting" in m for m in said), said
    assert (folder / "model.onnx").stat().st_mtime_ns == before


def test_serving_imports_no_torch_and_reports_facts(folder: Path) -> None:
    code = (
        "import json, sys\n"
        "from encloud.server.inference.embedder import Embedder\n"
        f"e = Embedder.load({str(folder)!r})\n"
        "e.embed(['x'])\n"
        "facts = e.facts()\n"
        "e.close()\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "print(json.dumps(facts))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    facts = json.loads(out.stdout.splitlines()[-1])
    assert facts["dimension"] == 384 and facts["max_tokens"] == 256
    assert facts["pooling"] == "mean" and facts["normalizes"] is True
    assert facts["onnxruntime"] and facts["tokenizers"] and facts["cpu_feature_class"]
