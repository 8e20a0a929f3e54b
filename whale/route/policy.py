"""The complexity route's decisions: a prompt's difficulty score -> a band -> a mode and a thinking budget.

Bands are ordered by `min_score`; a request takes the last band whose `min_score` its score reaches. A follow-up
turn (one with earlier assistant turns) scores at least `carry` times its conversation's previous score, so a
short "and for n = 7?" after a hard problem is not scored as small talk, and the carried difficulty fades over
the turns. What may override the score, strongest first: the request's own `thinking` (reason "request"), a mode
fixed for its API key ("key"), and the conversation's earlier mode ("sticky": a conversation keeps its mode unless
the turn's score is more than `sticky_margin` past the thinking threshold on the other side). A conversation is
known by a hash of its API key, system prompt and first user message; the last `memory_size` are remembered."""

from __future__ import annotations

import hashlib
import threading
import time
import tomllib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whale.errors import InvalidRequestError
from whale.route.difficulty import DifficultyModel, shipped_model
from whale.upstream import PROTOCOLS

THINKING, NON_THINKING = "thinking", "non-thinking"
MODES = (THINKING, NON_THINKING)
AUTO_NAMES = ("deepseek-auto", "auto")
THINKING_ONLY_FAST_BUDGET = 256  # a non-thinking band's budget on a model that always thinks (an R1 distill)


@dataclass(frozen=True)
class Band:
    name: str
    min_score: float
    mode: str
    # thinking: the reasoning budget (None: all that max_tokens leaves for the answer's room); non-thinking: the
    # budget used instead on a model that can only think
    budget: int | None = None
    # generate this band's requests on another engine (whale.upstream) with the same tokenizer: a larger model of
    # the family, or a pool of replicas of it; empty: the server's own engine
    upstream: tuple[str, ...] = ()
    upstream_protocol: str = "sglang"
    upstream_model: str | None = None  # a vllm upstream's model id (default: the first it lists)


DEFAULT_BANDS = (Band("fast", 0.0, NON_THINKING, THINKING_ONLY_FAST_BUDGET), Band("think", 0.5, THINKING, 2048),
                 Band("deep", 0.8, THINKING, None))


@dataclass(frozen=True)
class RouteDecision:
    """What the route chose for one request; `budget` is the reasoning budget the request runs with."""

    mode: str
    budget: int | None
    score: float
    band: str
    reason: str  # "score", "sticky", "request" or "key"
    seconds: float = 0.0  # the time the decision took (scoring included)

    def headers(self) -> dict[str, str]:
        out = {"x-whale-route-mode": self.mode, "x-whale-route-score": f"{self.score:.4f}"}
        if self.mode == THINKING and self.budget is not None:
            out["x-whale-route-budget"] = str(self.budget)
        return out

    def usage_field(self) -> dict[str, Any]:
        """The usage block's `whale_route` extension."""
        return {"mode": self.mode, "budget": self.budget if self.mode == THINKING else None,
                "score": round(self.score, 4), "band": self.band, "reason": self.reason}


@dataclass(frozen=True)
class RoutePolicy:
    bands: tuple[Band, ...] = DEFAULT_BANDS
    sticky_margin: float = 0.2
    carry: float = 0.7  # a follow-up turn scores at least this share of the conversation's previous score
    key_modes: Mapping[str, str] = field(default_factory=dict)  # API key -> the mode its requests always get
    default: bool = False  # also route requests that leave the mode to the server (no `thinking`, a default name)
    model_path: Path | None = None  # None: the shipped difficulty model
    memory_size: int = 4096

    def __post_init__(self) -> None:
        if not self.bands or self.bands[0].min_score > 0:
            raise InvalidRequestError("route bands: the first band must start at min_score 0")
        scores = [band.min_score for band in self.bands]
        if scores != sorted(scores) or len(set(scores)) != len(scores) or scores[-1] > 1:
            raise InvalidRequestError(f"route bands: min_score must rise strictly within [0, 1] (got {scores})")
        for band in self.bands:
            if band.mode not in MODES:
                raise InvalidRequestError(f"route band {band.name!r}: mode {band.mode!r} must be one of {MODES}")
            if band.budget is not None and band.budget < 1:
                raise InvalidRequestError(f"route band {band.name!r}: budget must be at least 1 token")
            if band.upstream_protocol not in PROTOCOLS:
                raise InvalidRequestError(f"route band {band.name!r}: upstream_protocol {band.upstream_protocol!r} "
                                          f"must be one of {PROTOCOLS}")
        for key, mode in self.key_modes.items():
            if mode not in MODES:
                raise InvalidRequestError(f"route key ****{key[-4:]}: mode {mode!r} must be one of {MODES}")
        for name in ("sticky_margin", "carry"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidRequestError(f"route {name} {getattr(self, name)} must be in [0, 1]")

    def band_for(self, score: float) -> Band:
        return [band for band in self.bands if score >= band.min_score][-1]

    def first_band(self, mode: str) -> Band | None:
        return next((band for band in self.bands if band.mode == mode), None)

    @property
    def think_above(self) -> float:
        """The lowest score that thinks on score alone (above 1: no band thinks)."""
        band = self.first_band(THINKING)
        return band.min_score if band is not None else 1.01


def load_policy(path: Path, default: bool | None = None) -> RoutePolicy:
    """A RoutePolicy from a TOML file (docs/route.md); `default`, when given, overrides the file's."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidRequestError(f"route config {path}: {exc}") from exc
    section = data.get("route", data)
    known = {"band", "sticky_margin", "carry", "keys", "default", "model", "memory_size"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise InvalidRequestError(f"route config {path}: unknown settings {unknown}; known: {sorted(known)}")
    options: dict[str, Any] = {}
    if "band" in section:
        try:
            options["bands"] = tuple(
                Band(b["name"], float(b.get("min_score", 0.0)), b["mode"], b.get("budget"),
                     tuple(b.get("upstream", ())), b.get("upstream_protocol", "sglang"), b.get("upstream_model"))
                for b in section["band"])
        except (KeyError, TypeError) as exc:
            raise InvalidRequestError(f"route config {path}: each [[route.band]] needs name and mode (and may set "
                                      "min_score, budget, upstream, upstream_protocol, upstream_model): "
                                      f"{exc}") from exc
    for name in ("sticky_margin", "carry", "memory_size", "default"):
        if name in section:
            options[name] = section[name]
    if "keys" in section:
        options["key_modes"] = dict(section["keys"])
    if "model" in section:
        options["model_path"] = (Path(path).parent / section["model"]).resolve()
    if default is not None:
        options["default"] = default
    return RoutePolicy(**options)


def conversation_key(api_key: str | None, system: str, first_user: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in (api_key or "", system, first_user):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


class Router:
    """Decides each routed request; thread-safe (requests are prepared on worker threads)."""

    def __init__(self, policy: RoutePolicy, model: DifficultyModel | None = None):
        self.policy = policy
        self.model = model or (DifficultyModel.load(policy.model_path) if policy.model_path else shipped_model())
        # conversation -> the mode and score of its last routed turn
        self._conversations: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def decide(self, text: str, conversation: str | None = None, api_key: str | None = None,
               requested_mode: str | None = None, modes: frozenset[str] = frozenset(MODES),
               follow_up: bool = False) -> RouteDecision:
        """`text`: what is scored (the last user message); `conversation`: its key (conversation_key), remembered;
        `follow_up`: the request carries earlier assistant turns, so the conversation's last mode and score
        count; `modes`: the modes the model has."""
        start = time.perf_counter()
        policy = self.policy
        score = self.model.score(text)
        before = self._recall(conversation) if conversation is not None and follow_up else None
        if before is not None:
            score = max(score, policy.carry * before[1])
        band, reason = policy.band_for(score), "score"
        forced = requested_mode or policy.key_modes.get(api_key or "")
        if forced is not None:
            reason = "request" if requested_mode else "key"
            if band.mode != forced:
                band = policy.first_band(forced) or Band(forced, 0.0, forced)
        elif before is not None:
            band, reason = self._hysteresis(before[0], score, band)
        mode = band.mode if band.mode in modes else next(iter(modes))
        if conversation is not None:
            with self._lock:
                self._conversations[conversation] = (mode, score)
                self._conversations.move_to_end(conversation)
                while len(self._conversations) > policy.memory_size:
                    self._conversations.popitem(last=False)
        budget = band.budget if mode == THINKING else None
        return RouteDecision(mode, budget, score, band.name, reason, time.perf_counter() - start)

    def _recall(self, conversation: str) -> tuple[str, float] | None:
        with self._lock:
            return self._conversations.get(conversation)

    def _hysteresis(self, before: str, score: float, band: Band) -> tuple[Band, str]:
        """The band of a follow-up turn: the conversation's mode stays unless the score is `sticky_margin` past the
        thinking threshold on the other side."""
        policy = self.policy
        if before == band.mode:
            return band, "score"
        threshold, margin = policy.think_above, policy.sticky_margin
        if before == THINKING and score >= threshold - margin:
            return policy.first_band(THINKING), "sticky"
        if before == NON_THINKING and score < threshold + margin:
            below = [b for b in policy.bands if b.mode == NON_THINKING and b.min_score <= score]
            return (below[-1] if below else policy.first_band(NON_THINKING)), "sticky"
        return band, "score"
