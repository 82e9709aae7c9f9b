"""What q4_1-native's correction costs, and what the exact alternatives cost instead.

``python -m bench.q4_1_correction`` builds three variants of the served ``q4_1-native`` export
in a temporary folder and times them against it through the engine's runner (2 threads,
spinning, as served), rounds interleaved, medians printed:

- ``no-correction``: the correction nodes removed (wrong answers): the most any cheaper
  correction could save;
- ``float-zero-points``: the correction folded into MatMulNBits as float zero points
  ``zp = 8 - c/d`` (exact: ``d*(q - zp) = d*q + m``), one node per matrix;
- ``extra-k-blocks``: the activation concatenated with itself and each matrix given K/32 more
  blocks whose codes are all 9 and whose scales are ``c`` (exact: each adds ``c * block sum``),
  one node per matrix and one Concat per activation, twice the weight bytes.

docs/MODEL_PIPELINE.md has the figures and the decision. Experiment only: the server never
imports this module.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from encloud.server.inference.export import DEFAULT_PRECISION, export_model
from encloud.server.inference.runner import ModelRunner

_SIDE_FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json")


def _corrections(graph: onnx.GraphProto) -> list[tuple[str, str, str]]:
    """(MatMulNBits, correction MatMul, correction Add) node names per corrected matrix."""
    producer = {out: node for node in graph.node for out in node.output}
    return [
        (producer[n.input[0]].name, producer[n.input[1]].name, n.name)
        for n in graph.node
        if n.op_type == "Add" and n.name.endswith("Q4_1Correction/Add")
    ]


def _variant(src: Path, kind: str) -> onnx.ModelProto:
    model = onnx.load(str(src / "model.onnx"))
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    dropped: set[str] = set()
    duplicated: dict[str, str] = {}
    inserted: dict[str, onnx.NodeProto] = {}
    for sym_name, mm_name, add_name in _corrections(graph):
        sym, mm, add = nodes[sym_name], nodes[mm_name], nodes[add_name]
        sym.output[0] = add.output[0]
        dropped |= {mm_name, add_name}
        c = numpy_helper.to_array(inits[mm.input[1]]).T  # [N, blocks]
        if kind == "float-zero-points":
            d = numpy_helper.to_array(inits[sym.input[2]])  # [N, blocks]
            zp = (8.0 - c / np.where(d == 0, 1, d)).astype(np.float32)
            graph.initializer.append(numpy_helper.from_array(zp, sym.input[1] + "_zp"))
            sym.input.append(sym.input[1] + "_zp")
        elif kind == "extra-k-blocks":
            x = sym.input[0]
            if x not in duplicated:
                duplicated[x] = x + "_twice"
                inserted[sym_name] = helper.make_node("Concat", [x, x], [x + "_twice"], axis=-1)
            codes = numpy_helper.to_array(inits[sym.input[1]])
            scales = numpy_helper.to_array(inits[sym.input[2]])
            codes = np.concatenate([codes, np.full_like(codes, 0x99)], axis=1)
            scales = np.concatenate([scales, c.astype(scales.dtype)], axis=1)
            inits[sym.input[1]].CopyFrom(numpy_helper.from_array(codes, sym.input[1]))
            inits[sym.input[2]].CopyFrom(numpy_helper.from_array(scales, sym.input[2]))
            next(a for a in sym.attribute if a.name == "K").i *= 2
            sym.input[0] = duplicated[x]
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name in dropped or "q4_1_blocksum" in node.name:
            continue
        if node.name in inserted:
            kept.append(inserted[node.name])
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        kept.append(copy)
    del graph.node[:]
    graph.node.extend(kept)
    return model


def _save(model: onnx.ModelProto, src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in _SIDE_FILES:
        shutil.copy(src / name, folder / name)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data")  # fmt: skip
    return folder


def main() -> int:
    src = export_model(None, precision=DEFAULT_PRECISION, progress=lambda _: None)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 20000, size=(1, 128))
    with tempfile.TemporaryDirectory(prefix="encloud-q4_1-") as tmp:
        folders = {"served": src}
        for kind in ("no-correction", "float-zero-points", "extra-k-blocks"):
            folders[kind] = _save(_variant(src, kind), src, Path(tmp) / kind)
        runners = {
            name: ModelRunner(
                folder, threads=2, spinning=True, provider="cpu", max_rows=8, max_len=1024
            )
            for name, folder in folders.items()
        }
        reference = None
        for name, runner in runners.items():
            runner.ensure(512, [0] * 8)
            logits = runner.run(0, prompt, [0])[0]
            reference = logits if reference is None else reference
            gap = float(np.max(np.abs(logits - reference)))
            print(f"{name}: max |logit - served| {gap:.3f}", file=sys.stderr)
            for row in range(1, 8):
                runner.run(row, prompt, [0])
        times: dict[str, dict[str, list[float]]] = {n: {} for n in runners}
        one, eight = np.array([[42]]), np.full((8, 1), 42)
        cases = {
            "decode, batch 1": (lambda r: r.run(0, one, [128]), 30),
            "decode, batch 8": (lambda r: r.run(0, eight, [128] * 8), 12),
            "prefill, 256 tokens": (lambda r: r.run(0, prompt[:, :1].repeat(256, 1), [0]), 1),
        }
        for _round in range(5):
            for name, runner in runners.items():
                for case, (step, repeat) in cases.items():
                    for _ in range(repeat):
                        began = time.perf_counter()
                        step(runner)
                        times[name].setdefault(case, []).append(time.perf_counter() - began)
    print("| variant | " + " | ".join(f"{c} (ms)" for c in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for name, by_case in times.items():
        cells = [f"{1000 * statistics.median(by_case[c]):.1f}" for c in cases]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
