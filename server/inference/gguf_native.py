"""Carry a Q4_1 GGUF's own 4-bit codes and scales (and its Q8_0 embeddings) into the builder's
int4 ONNX graph, so the served model computes what llama.cpp computes, without re-rounding.

Precision ``q4_1-native`` (docs/MODEL_PIPELINE.md has the figures). A Q4_1 block of 32 weights
along K stores fp16 ``d``, fp16 ``m`` and 4-bit codes ``q`` in 0..15, with ``w = d*q + m``.
Equivalently ``w = d*(q - 8) + c`` with ``c = m + 8*d``, so for an activation row ``x``::

    y[n] = sum_k x[k] * d[n,k//32] * (q[n,k] - 8)          (MatMulNBits, 4-bit, no zero points:
                                                            the default zero point is 8)
         + sum_b S[b] * c[n,b],  S[b] = sum_{k in block b} x[k]     (the correction)

MatMulNBits's uint8 zero points cannot express ``m`` (it would need ``zp = -m/d``, generally not
an integer in 0..15) and float zero points run a slow path, hence the decomposition. The block
sums ``S`` (Reshape to ``[..., K/32, 32]`` + ReduceSum) are computed once per activation and
shared by every matrix that reads it (q/k/v are already one fused matrix; gate and up share
theirs); each matrix adds ``MatMul(S, C)`` with ``C`` the ``(K/32) x N`` float matrix of ``c``.

Q8_0 (``w = d*q``, q int8) is exactly an 8-bit MatMulNBits with codes ``q + 128`` and the default
zero point 128; the tied token embeddings use the same bytes through an 8-bit
``GatherBlockQuantized``.

Layout mapping (checked against the fp32 export, which holds transformers' dequantised weights):
GGUF tensors are row-major ``[N, K]`` (``ne0 = K``) with the blocks along K, as MatMulNBits's
``[N, K/32, blob]``; a Q4_1 block packs element ``j`` in the low nibble and ``j + 16`` in the
high nibble of byte ``j``, MatMulNBits packs elements ``2j`` (low) and ``2j + 1`` (high) in byte
``j``; llama.cpp's ``attn_q`` / ``attn_k`` rows are permuted for its rotary layout, and the rows
are un-permuted as transformers' GGUF loader does (``reverse_permute``); the builder's fused
``qkv_proj`` stacks q, k, v rows in that order.

Export-time only (numpy, onnx, gguf); the server never imports this module.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

# Bumped when the construction changes: part of the export cache key.
CONSTRUCTION_VERSION = "1"
QK = 32
_LAYER_MATMULS = {
    "attn/qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "attn/o_proj": ("attn_output",),
    "mlp/gate_proj": ("ffn_gate",),
    "mlp/up_proj": ("ffn_up",),
    "mlp/down_proj": ("ffn_down",),
}
_NODE_RE = re.compile(r"^/model/layers\.(\d+)/(attn/\w+|mlp/\w+)/MatMul_Q4$")


def _q4_1_blocks(raw: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d [n, k/32] f32, m [n, k/32] f32, q [n, k/32, 32] uint8 codes 0..15) of a Q4_1 tensor."""
    blocks = np.ascontiguousarray(raw).reshape(n, k // QK, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return d, m, q


def _q8_0_blocks(raw: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(d [n, k/32] f32, q [n, k/32, 32] int8) of a Q8_0 tensor."""
    blocks = np.ascontiguousarray(raw).reshape(n, k // QK, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:34].copy().view(np.int8)
    return d, q


def _pack_nbits4(q: np.ndarray) -> np.ndarray:
    """[n, nb, 32] codes 0..15 -> MatMulNBits blob [n, nb, 16]: element 2j low, 2j+1 high."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def reverse_permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (transformers' ``reverse_permute``)."""
    dim = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, dim, 2).swapaxes(2, 1).reshape(n_rows)


class GgufQ4_1:
    """The Q4_1 / Q8_0 tensors of a llama GGUF, mapped to the builder's HF-derived layout."""

    def __init__(self, gguf_path: Path) -> None:
        import gguf

        self._reader = gguf.GGUFReader(str(gguf_path))
        self._tensors = {t.name: t for t in self._reader.tensors}

        def field(name: str) -> int:
            f = self._reader.fields[name]
            return int(f.parts[f.data[0]][0])

        self.n_head = field("llama.attention.head_count")
        self.n_head_kv = field("llama.attention.head_count_kv")
        self.n_layer = field("llama.block_count")

    def _tensor(self, name: str):
        t = self._tensors[name]
        k, n = (int(x) for x in t.shape[:2])
        return t, n, k

    def q4_1(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(d, m, q) of one Q4_1 matrix with rows in the HF order."""
        t, n, k = self._tensor(name)
        if t.tensor_type.name != "Q4_1":
            raise ValueError(f"{name} is {t.tensor_type.name}, not Q4_1")
        d, m, q = _q4_1_blocks(t.data, n, k)
        kind = name.rsplit(".", 2)[-2]
        if kind in ("attn_q", "attn_k"):
            heads = self.n_head if kind == "attn_q" else self.n_head_kv
            perm = reverse_permute_rows(n, heads)
            d, m, q = d[perm], m[perm], q[perm]
        return d, m, q

    def matmul(self, layer: int, proj: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(d, m, q) of one builder matrix (fused q/k/v stacked along N)."""
        parts = [self.q4_1(f"blk.{layer}.{g}.weight") for g in _LAYER_MATMULS[proj]]
        return tuple(np.concatenate(x, axis=0) for x in zip(*parts, strict=True))  # type: ignore[return-value]

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(d, q) of the Q8_0 token embeddings [vocab, hidden/32(, 32)]."""
        t, n, k = self._tensor("token_embd.weight")
        if t.tensor_type.name != "Q8_0":
            raise ValueError(f"token_embd.weight is {t.tensor_type.name}, not Q8_0")
        return _q8_0_blocks(t.data, n, k)


def dequantize(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_1 [n, K] float32 weights, as llama.cpp dequantises them."""
    return (d[..., None] * q.astype(np.float32) + m[..., None]).reshape(d.shape[0], -1)


def convert(
    int4_onnx: Path,
    gguf_path: Path,
    out_onnx: Path,
    data_name: str,
    *,
    accuracy_level: int | None = None,
    fuse_gate_up: bool = True,
) -> dict:
    """Rewrite the builder's int4 ``int4_onnx`` (tied embeddings) into ``out_onnx`` with the
    GGUF's own codes, scales and corrections; external data in ``data_name`` beside it.
    Returns counts for the export's provenance."""
    import onnx
    from onnx import helper, numpy_helper

    src = GgufQ4_1(gguf_path)
    model = onnx.load(str(int4_onnx))  # with external data
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}

    def put(name: str, array: np.ndarray) -> None:
        tensor = numpy_helper.from_array(array, name)
        if name in inits:
            inits[name].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
            inits[name] = graph.initializer[-1]

    new_nodes: list = []
    block_sums: dict[str, str] = {}

    def block_sum(x: str, layer: int, k: int) -> str:
        if x not in block_sums:
            base = f"/model/layers.{layer}/q4_1_blocksum/{len(block_sums)}"
            put(f"{base}/shape", np.array([0, 0, k // QK, QK], dtype=np.int64))
            put(f"{base}/axes", np.array([-1], dtype=np.int64))
            new_nodes.extend(
                [
                    helper.make_node(
                        "Reshape",
                        [x, f"{base}/shape"],
                        [f"{base}/blocks"],
                        name=f"{base}/Reshape",
                    ),
                    helper.make_node(
                        "ReduceSum",
                        [f"{base}/blocks", f"{base}/axes"],
                        [f"{base}/sums"],
                        name=f"{base}/ReduceSum",
                        keepdims=0,
                    ),
                ]
            )
            block_sums[x] = f"{base}/sums"
        return block_sums[x]

    nodes = {}
    for node in graph.node:
        match = _NODE_RE.match(node.name) if node.op_type == "MatMulNBits" else None
        if match is not None:
            nodes[(int(match.group(1)), match.group(2))] = node
    corrected = 0
    for node in list(graph.node):
        match = _NODE_RE.match(node.name) if node.op_type == "MatMulNBits" else None
        if match is None:
            new_nodes.append(node)
            continue
        layer, proj = int(match.group(1)), match.group(2)
        if fuse_gate_up and proj == "mlp/up_proj":
            for name in node.input[1:]:  # fused into gate_proj's node below
                graph.initializer.remove(inits.pop(name))
            continue
        parts = [node]
        if fuse_gate_up and proj == "mlp/gate_proj":
            parts.append(nodes[(layer, "mlp/up_proj")])
            if parts[1].input[0] != node.input[0]:
                raise ValueError(f"layer {layer}: gate and up read different activations")
        ds, cs, qs, ns = [], [], [], []
        for part in parts:
            attrs = {a.name: helper.get_attribute_value(a) for a in part.attribute}
            if attrs.get("bits") != 4 or attrs.get("block_size") != QK or len(part.input) != 3:
                raise ValueError(f"unexpected MatMulNBits {part.name}: {attrs}, {list(part.input)}")
            pm = _NODE_RE.match(part.name)
            assert pm is not None
            d, m, q = src.matmul(layer, pm.group(2))
            n, k = int(attrs["N"]), int(attrs["K"])
            if d.shape != (n, k // QK) or tuple(inits[part.input[1]].dims) != (n, k // QK, QK // 2):
                raise ValueError(f"{part.name}: GGUF shape {d.shape} != {(n, k // QK)}")
            ds.append(d)
            cs.append(m + 8.0 * d)
            qs.append(q)
            ns.append(n)
            corrected += 1
        d, c, q = (np.concatenate(a, axis=0) for a in (ds, cs, qs))
        b_name, s_name = node.input[1], node.input[2]
        put(b_name, _pack_nbits4(q))
        put(s_name, d)
        for a in node.attribute:
            if a.name == "N":
                a.i = sum(ns)
            elif a.name == "accuracy_level" and accuracy_level is not None:
                a.i = accuracy_level
        new_nodes.append(node)
        # Correction: block sums of the activation (shared), times C = (m + 8d)^T.
        sums = block_sum(node.input[0], layer, k)
        c_name = b_name.replace("weight_Q4", "weight_q4_1_correction")
        put(c_name, np.ascontiguousarray(c.T.astype(np.float32)))
        outputs = [p.output[0] for p in parts]
        raw = f"{outputs[0]}/symmetric"
        node.output[0] = raw
        prefix = node.name.rsplit("/", 1)[0]
        summed = outputs[0] if len(parts) == 1 else f"{prefix}/q4_1_fused"
        new_nodes.extend(
            [
                helper.make_node(
                    "MatMul",
                    [sums, c_name],
                    [f"{prefix}/q4_1_correction"],
                    name=f"{prefix}/Q4_1Correction/MatMul",
                ),
                helper.make_node(
                    "Add",
                    [raw, f"{prefix}/q4_1_correction"],
                    [summed],
                    name=f"{prefix}/Q4_1Correction/Add",
                ),
            ]
        )
        if len(parts) > 1:
            split_name = f"{prefix}/q4_1_split"
            put(split_name, np.array(ns, dtype=np.int64))
            new_nodes.append(
                helper.make_node(
                    "Split", [summed, split_name], outputs, name=f"{prefix}/GateUpSplit", axis=-1
                )
            )
            node.name = node.name.replace("gate_proj", "gate_up_proj")
    expected = src.n_layer * len(_LAYER_MATMULS)
    if corrected != expected:
        raise ValueError(f"rewrote {corrected} matrices, expected {expected}")

    # Tied embeddings / lm_head: Q8_0 -> 8-bit MatMulNBits and 8-bit GatherBlockQuantized.
    ed, eq = src.embeddings()
    vocab, nb = ed.shape
    codes = (eq.astype(np.int16) + 128).astype(np.uint8)  # [vocab, nb, 32]
    lm = next(
        nd for nd in new_nodes if nd.op_type == "MatMulNBits" and nd.name.startswith("/lm_head/")
    )
    gather = next(nd for nd in new_nodes if nd.op_type == "GatherBlockQuantized")
    reshape = next(nd for nd in new_nodes if nd.output[0] == gather.input[0])
    old_b, scales = lm.input[1], lm.input[2]
    if reshape.input[0] != old_b or gather.input[2] != scales:
        raise ValueError("embeddings are not tied to lm_head in the int4 graph")
    new_b = old_b.replace("weight_Q4", "weight_Q8")
    graph.initializer.remove(inits.pop(old_b))
    put(new_b, codes)
    put(scales, ed)
    lm.input[1] = new_b
    lm.name = lm.name.replace("MatMul_Q4", "MatMul_Q8")
    for a in lm.attribute:
        if a.name == "bits":
            a.i = 8
    reshape.input[0] = new_b
    shape_name = "/model/embed_tokens/q8_0_shape"
    put(shape_name, np.array([vocab, nb * QK], dtype=np.int64))
    reshape.input[1] = shape_name
    for a in gather.attribute:
        if a.name == "bits":
            a.i = 8
    # Drop constants nobody reads any more (the old [vocab, K/2] reshape shape).
    used = {i for nd in new_nodes for i in nd.input}
    new_nodes = [
        nd for nd in new_nodes if nd.op_type != "Constant" or any(o in used for o in nd.output)
    ]
    del graph.node[:]
    graph.node.extend(new_nodes)
    stale = [vi for vi in graph.value_info if vi.name == reshape.output[0]]
    for vi in stale:  # its recorded shape was the 4-bit [vocab, K/2]
        graph.value_info.remove(vi)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(out_onnx),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    return {
        "q4_1_matrices": corrected,
        "block_sums": len(block_sums),
        "gate_up_fused": fuse_gate_up,
        "q8_0_lm_head": True,
    }


__all__ = ["CONSTRUCTION_VERSION", "GgufQ4_1", "convert", "dequantize", "reverse_permute_rows"]
