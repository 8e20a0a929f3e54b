"""The model names a client may send, and the thinking mode each one asks for (docs/sources.md §1).

Today's hosted API (since 2026-04-24) serves `deepseek-v4-flash` and `deepseek-v4-pro` (and `deepseek-flash`),
thinking on by default; the earlier `deepseek-chat` / `deepseek-reasoner` (non-thinking / thinking) were retired
on 2026-07-24, but clients written then still send them. whale answers every one of these names, and the served
model's own id, with the one model it serves: on a model with both modes each name picks its mode (the own id
the model's default), on a single-mode model every name runs that mode. `deepseek-auto` and `auto` leave the mode
and the thinking budget to the complexity route (server/routing.py)."""

from __future__ import annotations

CHAT_ALIAS, REASONER_ALIAS = "deepseek-chat", "deepseek-reasoner"
V4_FLASH, V4_PRO = "deepseek-v4-flash", "deepseek-v4-pro"
# name -> thinking by default
NAME_THINKING: dict[str, bool] = {V4_FLASH: True, V4_PRO: True, "deepseek-flash": True, CHAT_ALIAS: False,
                                  REASONER_ALIAS: True}


def served_names(own: str, routed: tuple[str, ...] = ()) -> list[str]:
    """Every name the server answers to: the model's own id first, then the API's names, then the complexity
    route's (`deepseek-auto`, `auto`: whale.route) where it is on."""
    return [own, *(name for name in (*NAME_THINKING, *routed) if name != own)]


def anthropic_model(requested: str, served: list[str]) -> str:
    """The served name an Anthropic request runs as: its own if served, else as the hosted Anthropic route
    maps Claude names (claude-opus* -> deepseek-v4-pro; everything else -> deepseek-v4-flash)."""
    if requested in served:
        return requested
    return V4_PRO if requested.startswith("claude-opus") else V4_FLASH
