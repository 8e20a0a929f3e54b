"""Train the difficulty model and report how the route does on the held-out prompts.

    python -m whale.route.train [--data tests/data/route/prompts.jsonl] [--out whale/route/difficulty.npz]

A logistic regression (L2, its strength picked by 5-fold cross-validation on the train split alone), fitted by
full-batch Adam in numpy. The report: held-out accuracy of the mode (thinking for "hard", non-thinking for
"easy") under the default bands, the share sent to the cheap mode, per category, the estimated tokens against
"always thinking" and "never thinking" (reasoning lengths per class are assumptions, flags below), and the
scoring time per request on this CPU."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from whale.route.difficulty import SHIPPED_MODEL, DifficultyModel
from whale.route.features import NUM_FEATURES, sparse_features
from whale.route.policy import NON_THINKING, THINKING, RoutePolicy

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "route" / "prompts.jsonl"
L2_CHOICES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 1e-2)


@dataclass(frozen=True)
class Example:
    prompt: str
    hard: bool
    category: str
    split: str


def load_examples(path: Path) -> list[Example]:
    out = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row["label"] not in ("easy", "hard") or row["split"] not in ("train", "heldout"):
            raise ValueError(f"{path}:{number}: label must be easy/hard and split train/heldout")
        out.append(Example(row["prompt"], row["label"] == "hard", row["category"], row["split"]))
    return out


def design_matrix(prompts: list[str]) -> np.ndarray:
    x = np.zeros((len(prompts), NUM_FEATURES), dtype=np.float64)
    for row, prompt in enumerate(prompts):
        for index, value in sparse_features(prompt).items():
            x[row, index] = value
    return x


def fit(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 600, lr: float = 0.05) -> tuple[np.ndarray, float]:
    """Weights and bias minimising mean log-loss + l2/2 |w|^2 (Adam, full batch, from zero: deterministic)."""
    w, b = np.zeros(x.shape[1]), 0.0
    m, v, mb, vb = np.zeros_like(w), np.zeros_like(w), 0.0, 0.0
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        gw = x.T @ (p - y) / len(y) + l2 * w
        gb = float(np.mean(p - y))
        m, v = beta1 * m + (1 - beta1) * gw, beta2 * v + (1 - beta2) * gw * gw
        mb, vb = beta1 * mb + (1 - beta1) * gb, beta2 * vb + (1 - beta2) * gb * gb
        step = lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        w -= step * m / (np.sqrt(v) + eps)
        b -= step * mb / (np.sqrt(vb) + eps)
    return w, b


def log_loss(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> float:
    p = np.clip(1.0 / (1.0 + np.exp(-(x @ w + b))), 1e-9, 1 - 1e-9)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def choose_l2(x: np.ndarray, y: np.ndarray, folds: int = 5) -> tuple[float, dict[float, float]]:
    """The L2 strength with the least cross-validated log-loss on the train split."""
    order = np.random.default_rng(0).permutation(len(y))
    losses = {}
    for l2 in L2_CHOICES:
        total = 0.0
        for k in range(folds):
            held = order[k::folds]
            kept = np.setdiff1d(order, held)
            w, b = fit(x[kept], y[kept], l2)
            total += log_loss(x[held], y[held], w, b) * len(held)
        losses[l2] = total / len(y)
    return min(losses, key=losses.get), losses


def train(examples: list[Example]) -> tuple[DifficultyModel, float, dict[float, float]]:
    rows = [e for e in examples if e.split == "train"]
    x, y = design_matrix([e.prompt for e in rows]), np.array([float(e.hard) for e in rows])
    l2, losses = choose_l2(x, y)
    w, b = fit(x, y, l2)
    return DifficultyModel(tuple(float(v) for v in w.astype(np.float32)), float(np.float32(b))), l2, losses


def _auc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, h in zip(scores, labels, strict=True) if h]
    neg = [s for s, h in zip(scores, labels, strict=True) if not h]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def heldout_report(model: DifficultyModel, examples: list[Example], policy: RoutePolicy, answer: int,
                   easy_reasoning: int, hard_reasoning: int, hard_share: float) -> str:
    held = [e for e in examples if e.split == "heldout"]
    scores = [model.score(e.prompt) for e in held]
    bands = [policy.band_for(s) for s in scores]
    thinks = [band.mode == THINKING for band in bands]
    correct = [t == e.hard for t, e in zip(thinks, held, strict=True)]
    hard_total = sum(e.hard for e in held)
    lines = [f"held-out prompts: {len(held)} ({hard_total} hard, {len(held) - hard_total} easy); "
             f"train: {len(examples) - len(held)}",
             f"accuracy (mode): {sum(correct) / len(held):.3f}   AUC: {_auc(scores, [e.hard for e in held]):.3f}",
             f"routed to non-thinking: {sum(not t for t in thinks) / len(held):.1%}   "
             f"hard sent to non-thinking: {sum(e.hard and not t for t, e in zip(thinks, held, strict=True))}/"
             f"{hard_total}   easy sent to thinking: {sum(t and not e.hard for t, e in zip(thinks, held, strict=True))}"
             f"/{len(held) - hard_total}", "", "| band | mode | budget | easy | hard |", "|---|---|---|---|---|"]
    for band in policy.bands:
        chosen = [e for e, b in zip(held, bands, strict=True) if b is band]
        budget = "-" if band.mode == NON_THINKING else (band.budget or "answer room")
        lines.append(f"| {band.name} | {band.mode} | {budget} | {sum(not e.hard for e in chosen)} | "
                     f"{sum(e.hard for e in chosen)} |")
    lines += ["", "| category | label | prompts | right mode |", "|---|---|---|---|"]
    for category in sorted({e.category for e in held}):
        picked = [(e, ok) for e, ok in zip(held, correct, strict=True) if e.category == category]
        lines.append(f"| {category} | {'hard' if picked[0][0].hard else 'easy'} | {len(picked)} | "
                     f"{sum(ok for _, ok in picked) / len(picked):.0%} |")
    routed = {True: 0, False: 0}  # by label: the route's tokens
    for e, band in zip(held, bands, strict=True):
        reasoning = hard_reasoning if e.hard else easy_reasoning
        routed[e.hard] += answer + (min(reasoning, band.budget or reasoning) if band.mode == THINKING else 0)
    always = hard_total * hard_reasoning + (len(held) - hard_total) * easy_reasoning + len(held) * answer
    never, total = len(held) * answer, routed[True] + routed[False]
    lines += ["", f"estimated output tokens over the held-out set (answer {answer}, reasoning {easy_reasoning} "
                  f"easy / {hard_reasoning} hard, capped by the band's budget):",
              f"  always thinking {always:,}   route {total:,} ({total / always:.1%} of always)   "
              f"never thinking {never:,} ({never / always:.1%})"]
    # the same per-prompt means, in a traffic mix of `hard_share` hard prompts
    mean = {hard: routed[hard] / max(1, sum(e.hard == hard for e in held)) for hard in (True, False)}
    mixed_route = hard_share * mean[True] + (1 - hard_share) * mean[False]
    mixed_always = answer + hard_share * hard_reasoning + (1 - hard_share) * easy_reasoning
    lines.append(f"  per request at {hard_share:.0%} hard traffic: always thinking {mixed_always:,.0f}, route "
                 f"{mixed_route:,.0f} ({mixed_route / mixed_always:.1%} of always), never thinking {answer} "
                 f"({answer / mixed_always:.1%})")
    return "\n".join(lines)


def scoring_times(model: DifficultyModel, prompts: list[str], repeats: int = 20) -> str:
    timings = []
    for prompt in prompts:
        for _ in range(repeats):
            start = time.perf_counter()
            model.score(prompt)
            timings.append(time.perf_counter() - start)
    timings.sort()
    return (f"scoring time per request ({len(timings)} scorings on this CPU): p50 "
            f"{timings[len(timings) // 2] * 1e3:.3f} ms, p99 {timings[int(len(timings) * 0.99)] * 1e3:.3f} ms, "
            f"max {timings[-1] * 1e3:.3f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL, help="where the trained model goes")
    parser.add_argument("--report-only", action="store_true", help="report on the model at --out, do not retrain")
    parser.add_argument("--answer-tokens", type=int, default=400, help="assumed answer length, both modes")
    parser.add_argument("--easy-reasoning", type=int, default=600, help="assumed reasoning length of an easy prompt")
    parser.add_argument("--hard-reasoning", type=int, default=6000, help="assumed reasoning length of a hard prompt")
    parser.add_argument("--hard-share", type=float, default=0.2, help="share of hard prompts in the assumed traffic")
    args = parser.parse_args(argv)
    examples = load_examples(args.data)
    if args.report_only:
        model = DifficultyModel.load(args.out)
    else:
        model, l2, losses = train(examples)
        model.save(args.out)
        print(f"trained on {sum(e.split == 'train' for e in examples)} prompts; L2 {l2:g} (5-fold log-loss: "
              + ", ".join(f"{k:g}: {v:.3f}" for k, v in losses.items()) + f"); saved {args.out}")
    print(heldout_report(model, examples, RoutePolicy(), args.answer_tokens, args.easy_reasoning,
                         args.hard_reasoning, args.hard_share))
    print(scoring_times(model, [e.prompt for e in examples if e.split == "heldout"]))


if __name__ == "__main__":
    main()
