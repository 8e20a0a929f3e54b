"""The complexity route in the server (docs/route.md): a chat request for `deepseek-auto` / `auto` (or, with
`--route default`, one that leaves the mode to the server) gets its mode and thinking budget from
whale.route's Router, written into the request as an explicit `thinking`, so the token-level controls run it
as if the client had asked; the decision travels on the PreparedRequest to the response's headers and usage."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from starlette.types import Scope

from whale.route.policy import (
    AUTO_NAMES,
    NON_THINKING,
    THINKING,
    RouteDecision,
    RoutePolicy,
    Router,
    conversation_key,
)
from whale.server.asgi import presented_key
from whale.server.model_names import CHAT_ALIAS, REASONER_ALIAS
from whale.server.protocol import ChatCompletionRequest, Thinking
from whale.server.served_model import PreparedRequest, ServedModel
from whale.server.state import ServerState

_CHOSEN_BY_NAME = (CHAT_ALIAS, REASONER_ALIAS)  # names that pick a mode themselves


def routed(router: Router | None, req: ChatCompletionRequest) -> bool:
    if router is None:
        return False
    if req.model in AUTO_NAMES:
        return True
    return router.policy.default and req.thinking is None and req.model not in _CHOSEN_BY_NAME


def decide(router: Router, served: ServedModel, req: ChatCompletionRequest, api_key: str | None) -> RouteDecision:
    """The route's decision for `req`: the last user message is scored; the conversation is known by its API key,
    system prompt and first user message, and is a follow-up where it holds an assistant turn."""
    users = [m for m in req.messages if m.role == "user"]
    system = "".join(m.text for m in req.messages if m.role in ("system", "developer"))
    conversation = conversation_key(api_key, system, users[0].text) if users else None
    requested = None if req.thinking is None else THINKING if req.thinking.type == "enabled" else NON_THINKING
    if requested is None and (req.logprobs or req.top_logprobs is not None):
        requested = NON_THINKING  # logprobs exist only without thinking: the request has chosen
    modes = frozenset(THINKING if mode == "thinking" else NON_THINKING for mode in served.capabilities.thinking_modes)
    follow_up = any(m.role == "assistant" for m in req.messages)
    return router.decide(users[-1].text if users else "", conversation, api_key, requested, modes,
                         follow_up)


def prepare_chat(router: Router | None, served: ServedModel, req: ChatCompletionRequest, api_key: str | None,
                 clamp_max_tokens: bool = False) -> PreparedRequest:
    """ServedModel.prepare_chat, routed where the request asks for it; the decision's budget is the one the
    request then runs with (after max_tokens' room for the answer, or the request's own budget or effort)."""
    if not routed(router, req):
        return served.prepare_chat(req, clamp_max_tokens=clamp_max_tokens)
    served.thinking_for(req.model)  # an unknown name is a 400 before any scoring
    decision = decide(router, served, req, api_key)
    budget = req.thinking.budget_tokens if req.thinking is not None else None
    if budget is None and req.reasoning_effort is None:
        budget = decision.budget
    thinking = Thinking(type="enabled" if decision.mode == THINKING else "disabled", budget_tokens=budget)
    prepared = served.prepare_chat(req.model_copy(update={"thinking": thinking}), clamp_max_tokens=clamp_max_tokens)
    prepared.route = dataclasses.replace(decision, budget=prepared.params.thinking_budget if prepared.thinking
                                         else None)
    return prepared


async def prepare_routed_chat(state: ServerState, req: ChatCompletionRequest, scope: Scope,
                              clamp_max_tokens: bool = False) -> PreparedRequest:
    """prepare_chat on a worker thread, for the HTTP request `scope` (its API key), counting the decision."""
    prepared = await asyncio.to_thread(prepare_chat, state.router, state.served, req, presented_key(scope),
                                       clamp_max_tokens)
    route = prepared.route
    if route is not None:
        state.metrics.route_decisions.labels(mode=route.mode, band=route.band, reason=route.reason).inc()
        state.metrics.route_seconds.observe(route.seconds)
    return prepared


def band_engines(policy: RoutePolicy, served: ServedModel, api_key: str | None = None) -> dict[str, Any]:
    """An UpstreamEngine for each band that names upstreams (the served model's tokenizer and context, so the
    upstream must share the tokenizer: a larger model of the family, or replicas of it); `api_key` is their
    bearer token."""
    from whale.upstream.engine import UpstreamEngine, wire_for

    return {band.name: UpstreamEngine(list(band.upstream), served.tokenizer, served.max_model_len, served.eos_ids,
                                      served.vocab_size or served.tokenizer.vocab_size,
                                      wire_for(band.upstream_protocol, band.upstream_model), api_key=api_key)
            for band in policy.bands if band.upstream}
