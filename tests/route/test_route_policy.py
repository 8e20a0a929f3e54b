"""The route's decisions with the shipped difficulty model on real prompts: bands, what overrides the score, a
conversation's carried difficulty and stickiness, the model's modes, and the TOML config."""

from __future__ import annotations

import pytest

from whale.errors import InvalidRequestError
from whale.route.difficulty import shipped_model
from whale.route.policy import (
    NON_THINKING,
    THINKING,
    Band,
    RoutePolicy,
    Router,
    conversation_key,
    load_policy,
)

HARD = "Prove that there are infinitely many primes of the form 4k + 3."
EASY = "hi! how's your day going?"
FOLLOW_UP = "ok, and what about the other case?"


def test_bands_pick_mode_and_budget_from_the_score():
    router = Router(RoutePolicy())
    hard, easy = router.decide(HARD), router.decide(EASY)
    assert (hard.mode, hard.band, hard.budget, hard.reason) == (THINKING, "deep", None, "score")
    assert (easy.mode, easy.band, easy.budget) == (NON_THINKING, "fast", None)
    assert easy.score < 0.5 <= 0.8 <= hard.score
    assert hard.headers() == {"x-whale-route-mode": "thinking", "x-whale-route-score": f"{hard.score:.4f}"}
    middle = Router(RoutePolicy(bands=(Band("fast", 0.0, NON_THINKING), Band("think", hard.score - 0.01, THINKING,
                                                                                      512),
                                       Band("deep", min(1.0, hard.score + 0.01), THINKING, None))))
    chosen = middle.decide(HARD)
    assert (chosen.band, chosen.budget) == ("think", 512)
    assert chosen.headers()["x-whale-route-budget"] == "512"
    assert chosen.usage_field() == {"mode": THINKING, "budget": 512, "score": round(chosen.score, 4),
                                    "band": "think", "reason": "score"}
    assert 0 < chosen.seconds < 0.05


def test_the_request_and_the_api_key_override_the_score():
    router = Router(RoutePolicy(key_modes={"sk-batch": NON_THINKING, "sk-research": THINKING}))
    assert router.decide(HARD, requested_mode=NON_THINKING).reason == "request"
    assert router.decide(HARD, requested_mode=NON_THINKING).mode == NON_THINKING
    forced = router.decide(EASY, api_key="sk-research")
    assert (forced.mode, forced.reason, forced.band, forced.budget) == (THINKING, "key", "think", 2048)
    assert router.decide(HARD, api_key="sk-batch").mode == NON_THINKING
    assert router.decide(HARD, api_key="sk-batch", requested_mode=THINKING).reason == "request"
    assert router.decide(EASY, api_key="sk-other").reason == "score"


def test_a_conversation_carries_its_difficulty_and_keeps_its_mode_within_the_margin():
    router = Router(RoutePolicy())  # thinking from 0.5, the think band to 0.8, margin 0.2, carry 0.7
    talk = conversation_key("sk-1", "You are terse.", HARD)
    first = router.decide(HARD, talk)
    turns = [router.decide(FOLLOW_UP, talk, follow_up=True) for _ in range(4)]
    own = shipped_model().score(FOLLOW_UP)
    assert own < 0.05 and router.decide(FOLLOW_UP).mode == NON_THINKING  # on its own: small talk
    expected = first.score
    for turn in turns:
        expected = max(own, 0.7 * expected)
        assert turn.score == pytest.approx(expected)
    assert [(t.mode, t.band, t.reason) for t in turns] == [
        (THINKING, "think", "score"),  # 0.70: the think band on its carried score
        (THINKING, "think", "sticky"),  # 0.49: below 0.5, within the margin
        (THINKING, "think", "sticky"),  # 0.34
        (NON_THINKING, "fast", "score")]  # 0.24: past the margin, the conversation stops thinking
    assert turns[0].budget == 2048
    again = router.decide(HARD, talk, follow_up=True)
    assert (again.mode, again.band) == (THINKING, "deep")  # a new hard question: past threshold + margin


def test_a_non_thinking_conversation_stays_so_below_threshold_plus_margin():
    hard = shipped_model().score(HARD)
    policy = RoutePolicy(bands=(Band("fast", 0.0, NON_THINKING), Band("think", hard - 0.05, THINKING, 1024)),
                         sticky_margin=0.1)
    router = Router(policy)
    talk = conversation_key(None, "", EASY)
    assert router.decide(EASY, talk).mode == NON_THINKING
    kept = router.decide(HARD, talk, follow_up=True)
    assert (kept.mode, kept.reason) == (NON_THINKING, "sticky")
    fresh = router.decide(HARD, conversation_key(None, "", HARD))
    assert (fresh.mode, fresh.reason) == (THINKING, "score")
    # a first turn is never sticky, even where another conversation began with the same words
    assert router.decide(HARD, talk).mode == THINKING


def test_conversation_memory_is_bounded():
    router = Router(RoutePolicy(memory_size=3, carry=0.0, sticky_margin=1.0))
    keys = [conversation_key(None, "", f"topic {i}") for i in range(5)]
    for key in keys:
        router.decide(HARD, key)
    assert router.decide(EASY, keys[-1], follow_up=True).reason == "sticky"
    assert router.decide(EASY, keys[0], follow_up=True).reason == "score"  # forgotten: decided by its score


def test_a_model_with_one_mode_gets_that_mode():
    router = Router(RoutePolicy())
    thinking_only = router.decide(EASY, modes=frozenset({THINKING}))
    assert (thinking_only.mode, thinking_only.budget, thinking_only.band) == (THINKING, 256, "fast")
    chat_only = router.decide(HARD, modes=frozenset({NON_THINKING}))
    assert (chat_only.mode, chat_only.budget) == (NON_THINKING, None)


def test_policies_that_cannot_work_are_refused():
    with pytest.raises(InvalidRequestError, match="must start at min_score 0"):
        RoutePolicy(bands=(Band("think", 0.3, THINKING),))
    with pytest.raises(InvalidRequestError, match="must rise strictly"):
        RoutePolicy(bands=(Band("a", 0.0, NON_THINKING), Band("b", 0.7, THINKING), Band("c", 0.6, THINKING)))
    with pytest.raises(InvalidRequestError, match="mode 'fast'"):
        RoutePolicy(bands=(Band("a", 0.0, "fast"),))
    with pytest.raises(InvalidRequestError, match="upstream_protocol 'grpc'"):
        RoutePolicy(bands=(Band("a", 0.0, NON_THINKING, upstream=("http://x",), upstream_protocol="grpc"),))
    with pytest.raises(InvalidRequestError, match=r"route key \*\*\*\*1234"):
        RoutePolicy(key_modes={"sk-1234": "always"})


def test_the_toml_config(tmp_path):
    shipped_model().save(tmp_path / "mine.npz")
    path = tmp_path / "route.toml"
    path.write_text("""
[route]
default = true
sticky_margin = 0.1
model = "mine.npz"

[[route.band]]
name = "fast"
mode = "non-thinking"

[[route.band]]
name = "think"
min_score = 0.6
mode = "thinking"
budget = 3000
upstream = ["http://pro-gateway:30000"]
upstream_protocol = "vllm"

[route.keys]
"sk-batch" = "non-thinking"
""")
    policy = load_policy(path)
    assert policy.default and policy.sticky_margin == 0.1 and policy.key_modes == {"sk-batch": NON_THINKING}
    assert policy.bands == (Band("fast", 0.0, NON_THINKING),
                            Band("think", 0.6, THINKING, 3000, ("http://pro-gateway:30000",), "vllm"))
    assert policy.model_path == tmp_path / "mine.npz"
    assert Router(policy).decide(HARD).budget == 3000
    assert not load_policy(path, default=False).default
    path.write_text("[route]\ncarry = 2\n")
    with pytest.raises(InvalidRequestError, match="carry 2 must be in"):
        load_policy(path)
    path.write_text("[route]\nthreshold = 0.5\n")
    with pytest.raises(InvalidRequestError, match=r"unknown settings \['threshold'\]"):
        load_policy(path)
    path.write_text("[[route.band]]\nmin_score = 0\n")
    with pytest.raises(InvalidRequestError, match="needs name and mode"):
        load_policy(path)
    path.write_text("[route\n")
    with pytest.raises(InvalidRequestError, match="route config"):
        load_policy(path)
