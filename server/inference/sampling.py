"""Per-request token selection over one row of logits (numpy only).

Every row of a batch keeps its own temperature, top-k, top-p, seed and repetition penalty: the
scheduler hands each row's last-position logits to that row's :class:`Sampler` (plain greedy
rows take the argmax of the step's logits directly).

Order of operations (the same as Hugging Face's ``generate``): repetition penalty over every
token seen so far (prompt included: a positive logit is divided by the penalty, a negative one
multiplied), then greedy argmax when the temperature is unset or 0, else temperature, top-k,
top-p, and a draw from the row's own ``numpy.random.Generator`` (PCG64 seeded by the request's
seed, or from the OS when it gives none). A fixed seed gives the same draws; the logits
themselves can differ in the last bits between batch compositions (see docs/MODEL_PIPELINE.md).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Candidates for top-p: tokens whose probability is at least this fraction of the best one.
# The nucleus is exact whenever it lies inside that set (all tokens left out are smaller than
# all kept); otherwise the full sort runs.
_TOP_P_PREFILTER = 1e-7


class Sampler:
    """Chooses one row's next token. Not thread-safe: owned by the scheduler thread."""

    def __init__(
        self,
        *,
        temperature: float | None,
        top_k: int | None,
        top_p: float | None,
        repetition_penalty: float | None,
        seed: int | None,
        prompt_ids: Iterable[int],
    ) -> None:
        self.temperature = float(temperature) if temperature else 0.0
        self.top_k = int(top_k) if top_k else 0
        self.top_p = float(top_p) if top_p is not None else 1.0
        self.penalty = float(repetition_penalty) if repetition_penalty else 1.0
        self._rng = np.random.default_rng(seed)
        self._seen: set[int] = set(int(t) for t in prompt_ids) if self.penalty != 1.0 else set()

    @property
    def needs_logits(self) -> bool:
        """False for plain greedy: the generator's own argmax gives the same token."""
        return self.temperature > 0.0 or self.penalty != 1.0

    def observe(self, token: int) -> None:
        if self.penalty != 1.0:
            self._seen.add(int(token))

    def choose(self, logits: np.ndarray) -> int:
        x = np.array(logits, dtype=np.float64, copy=True).reshape(-1)
        if self.penalty != 1.0 and self._seen:
            idx = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
            idx = idx[idx < x.size]
            v = x[idx]
            x[idx] = np.where(v > 0, v / self.penalty, v * self.penalty)
        if self.temperature <= 0.0:
            return int(np.argmax(x))
        x /= self.temperature
        if 0 < self.top_k < x.size:
            kth = np.partition(x, x.size - self.top_k)[x.size - self.top_k]
            x[x < kth] = -np.inf
        x -= np.max(x)
        probs = np.exp(x)
        probs /= probs.sum()
        if self.top_p < 1.0:
            probs = _nucleus(probs, self.top_p)
        return int(self._rng.choice(probs.size, p=probs))


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``; renormalise."""
    cand = np.flatnonzero(probs >= probs.max() * _TOP_P_PREFILTER)
    if probs[cand].sum() < top_p:
        cand = np.arange(probs.size)
    order = cand[np.argsort(-probs[cand], kind="stable")]
    cum = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cum, top_p)) + 1]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


__all__ = ["Sampler"]
