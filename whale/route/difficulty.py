"""The difficulty model: a logistic regression over whale.route.features, trained by `python -m whale.route.train`
on tests/data/route/prompts.jsonl and shipped as `difficulty.npz` beside this file (64 KiB). `score(text)` is
the probability that the prompt needs thinking, 0 to 1, in tens of microseconds on one CPU core."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from whale.errors import InvalidRequestError
from whale.route.features import HASH_BITS, NUM_FEATURES, sparse_features

SHIPPED_MODEL = Path(__file__).with_name("difficulty.npz")


@dataclass(frozen=True)
class DifficultyModel:
    weights: tuple[float, ...]  # NUM_FEATURES of them, as Python floats (the scoring loop indexes them one by one)
    bias: float

    def score(self, text: str) -> float:
        z = self.bias + sum(self.weights[i] * v for i, v in sparse_features(text).items())
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def save(self, path: Path) -> None:
        np.savez_compressed(path, weights=np.asarray(self.weights, dtype=np.float32),
                            bias=np.float32(self.bias), hash_bits=np.int32(HASH_BITS))

    @classmethod
    def load(cls, path: Path) -> DifficultyModel:
        try:
            with np.load(path) as data:
                weights, bias, bits = data["weights"], float(data["bias"]), int(data["hash_bits"])
        except (OSError, KeyError, ValueError) as exc:
            raise InvalidRequestError(f"{path} is not a whale difficulty model ({exc}); retrain it with "
                                      "`python -m whale.route.train --out PATH`") from exc
        if bits != HASH_BITS or weights.shape != (NUM_FEATURES,):
            raise InvalidRequestError(f"{path} was trained for other features ({bits} hash bits, {weights.shape[0]} "
                                      f"weights; this whale reads {HASH_BITS} and {NUM_FEATURES}): retrain it")
        return cls(tuple(float(w) for w in weights), bias)


@lru_cache(maxsize=1)
def shipped_model() -> DifficultyModel:
    return DifficultyModel.load(SHIPPED_MODEL)
