"""The difficulty model: the shipped weights on the held-out prompts, training from the train split alone, the
features' stability across processes, and the model file's checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from whale.errors import InvalidRequestError
from whale.route.difficulty import DifficultyModel, shipped_model
from whale.route.features import HASH_SIZE, NUM_FEATURES, sparse_features
from whale.route.train import DEFAULT_DATA, design_matrix, fit, load_examples

EXAMPLES = load_examples(DEFAULT_DATA)
HELD = [e for e in EXAMPLES if e.split == "heldout"]


def _accuracy(score, examples) -> float:
    return sum((score(e.prompt) >= 0.5) == e.hard for e in examples) / len(examples)


def test_the_labelled_set_is_what_its_readme_says():
    assert len(EXAMPLES) >= 400 and len({e.prompt for e in EXAMPLES}) == len(EXAMPLES)
    assert sum(e.hard for e in EXAMPLES) == sum(not e.hard for e in EXAMPLES)
    assert 100 <= len(HELD) <= 120
    categories = {e.category for e in EXAMPLES}
    assert {e.category for e in HELD} == categories  # every category is held out in part


def test_the_shipped_model_routes_the_held_out_prompts():
    model = shipped_model()
    assert _accuracy(model.score, HELD) >= 0.9
    scores = [model.score(e.prompt) for e in HELD]
    assert all(0.0 < s < 1.0 for s in scores)
    hard = [s for s, e in zip(scores, HELD, strict=True) if e.hard]
    easy = [s for s, e in zip(scores, HELD, strict=True) if not e.hard]
    assert np.mean(hard) - np.mean(easy) > 0.5


def test_training_on_the_train_split_learns_to_route_the_held_out_one():
    train = [e for e in EXAMPLES if e.split == "train"]
    x, y = design_matrix([e.prompt for e in train]), np.array([float(e.hard) for e in train])
    w, b = fit(x, y, l2=1e-5, steps=300)
    model = DifficultyModel(tuple(w), b)
    assert _accuracy(model.score, HELD) >= 0.85
    assert _accuracy(DifficultyModel((0.0,) * NUM_FEATURES, 0.0).score, HELD) == 0.5  # untrained: a coin


def test_features_are_the_same_in_every_process():
    """The hashes must not depend on Python's per-process salt, or the shipped weights would mean nothing."""
    text = "Prove that √2 is irrational, then 证明 it for 3 as well: 12345 steps?"
    here = {str(k): round(v, 9) for k, v in sparse_features(text).items()}
    code = ("import json, sys; from whale.route.features import sparse_features; "
            "print(json.dumps({str(k): round(v, 9) for k, v in sparse_features(sys.argv[1]).items()}))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, text], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"})
        assert json.loads(out.stdout) == here
    assert any(k < HASH_SIZE for k in map(int, here)) and str(HASH_SIZE) in here  # n-grams and shape measures


def test_a_saved_model_scores_as_before_and_a_wrong_file_is_refused(tmp_path):
    model = shipped_model()
    path = tmp_path / "mine.npz"
    model.save(path)
    again = DifficultyModel.load(path)
    for e in HELD[:10]:
        assert again.score(e.prompt) == pytest.approx(model.score(e.prompt), abs=1e-6)
    np.savez(tmp_path / "short.npz", weights=np.zeros(10, np.float32), bias=np.float32(0), hash_bits=np.int32(10))
    with pytest.raises(InvalidRequestError, match="trained for other features"):
        DifficultyModel.load(tmp_path / "short.npz")
    (tmp_path / "junk.npz").write_text("not a model")
    with pytest.raises(InvalidRequestError, match="not a whale difficulty model"):
        DifficultyModel.load(tmp_path / "junk.npz")
