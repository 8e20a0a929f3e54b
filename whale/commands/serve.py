"""`whale serve`: the DeepSeek-API-compatible HTTP server (OpenAI and Anthropic shapes) on uvicorn."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from whale.chat.capabilities import REASONING_EFFORTS
from whale.commands.generate import add_model_options, engine_options, set_threads
from whale.errors import InvalidRequestError
from whale.generation_defaults import RULE
from whale.route.policy import RoutePolicy, Router, load_policy

SHUTDOWN_MESSAGE = "the server is shutting down"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", epilog=f"Sampling: {RULE}; the banner shows what they are.")
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", action="append", default=None,
                        help="accept only this key (repeatable; default: $WHALE_API_KEY, else no key needed)")
    parser.add_argument("--protect-metrics", action="store_true",
                        help="require the API key on /metrics too (default: open, for Prometheus scrapers)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients see besides deepseek-chat / deepseek-reasoner")
    parser.add_argument("--chat-format", default=None, help="override the detected chat format (see whale models)")
    parser.add_argument("--thinking-budget", type=int, default=None,
                        help="reasoning budget (tokens) of a thinking request that names none; default: all that "
                             "max_tokens leaves after --min-answer-tokens")
    parser.add_argument("--effort-budgets", type=_effort_budgets, default=None, metavar="EFFORT=N,...",
                        help="reasoning budget of each reasoning_effort, e.g. low=1024,medium=4096,high=none "
                             "(default low=1024,medium=4096, the others none: only the answer's room)")
    parser.add_argument("--min-answer-tokens", type=int, default=None,
                        help="what a reasoning budget always leaves for the answer under max_tokens (at most half "
                             "of it; default 256)")
    parser.add_argument("--route", choices=("on", "default", "off"), default="on",
                        help="the complexity route (docs/route.md): on: model 'deepseek-auto' (or 'auto') gets its "
                             "mode and thinking budget from the prompt's difficulty; default: also every request "
                             "that leaves the mode to the server (no 'thinking', not deepseek-chat/-reasoner); "
                             "off: no route")
    parser.add_argument("--route-config", type=Path, default=None, metavar="TOML",
                        help="the route's bands (score thresholds, mode, budget), stickiness, modes fixed per API "
                             "key and difficulty model (docs/route.md)")
    parser.add_argument("--upstream", action="append", default=None, metavar="URL",
                        help="run no engine here: generate on this SGLang-protocol engine (SGLang, SGLang's model "
                             "gateway, another whale serve); repeat for fallbacks tried in order. --model then "
                             "only gives the tokenizer and chat format (no weights are read)")
    parser.add_argument("--upstream-protocol", choices=("sglang", "vllm"), default="sglang",
                        help="sglang: SGLang's /generate (SGLang, its model gateway, whale); vllm: vLLM's "
                             "/v1/completions with token ids (vLLM 0.10.2 or later, whale)")
    parser.add_argument("--upstream-model", default=None,
                        help="the model id a vllm upstream serves (default: the first its /v1/models lists)")
    parser.add_argument("--upstream-api-key", default=None,
                        help="bearer token for the upstream (default: $WHALE_UPSTREAM_API_KEY)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together")
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="requests queued beyond max-num-seqs before new ones get a 503")
    parser.add_argument("--max-concurrent-requests", type=int, default=None,
                        help="generation requests in flight beyond this get an immediate 429")
    parser.add_argument("--max-request-bytes", type=int, default=None,
                        help="request bodies over this get a 413 (default: 32 bytes per token of context, "
                             "at least 2 MiB)")
    parser.add_argument("--keepalive", type=float, default=10.0,
                        help="seconds a waiting request stays silent before keep-alives are sent")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="on Ctrl-C / SIGTERM, seconds requests in flight get to finish before they are ended "
                             "(a second signal ends them at once; the process is gone 30 s after this at the latest)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="info: a line per request (tokens in and out, cache hits, first token, tok/s)")
    parser.set_defaults(func=run)


def listen(host: str, port: int) -> socket.socket:
    """Bind the server's socket before the model loads, so a busy port is reported at once, not after it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidRequestError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port "
                                  "(or stop what holds this one)") from None
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first Ctrl-C (or SIGTERM) lets requests in flight finish for `drain_s` seconds and
    then ends them, each stream with its final chunk (finish_reason insufficient_system_resource) and `[DONE]`;
    a second one ends them at once and stops waiting for connections to close; later ones (a supervisor
    signalling its whole process group, repeatedly) change nothing. Should the shutdown still not be done
    `deadline_s` after the first signal, every thread's stack goes to stderr and the process exits (status 1):
    a server told to stop always stops."""

    def __init__(self, config: uvicorn.Config, state: Any, drain_s: float, deadline_s: float):
        super().__init__(config)
        self.state, self.drain_s, self.deadline_s = state, drain_s, deadline_s
        self.deadline: threading.Timer | None = None
        self.signals = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals == 1:
            print(f"whale serve: shutting down; requests in flight get {self.drain_s:g} s to finish "
                  "(Ctrl-C again ends them now)", file=sys.stderr)
            self.deadline = threading.Timer(self.drain_s, self.state.fail_all, (SHUTDOWN_MESSAGE,))
            self.deadline.daemon = True
            self.deadline.start()
            watchdog = threading.Timer(self.deadline_s, self._give_up)
            watchdog.daemon = True
            watchdog.start()
        elif self.signals == 2:
            self.deadline.cancel()
            self.state.fail_all(SHUTDOWN_MESSAGE)
            self.force_exit = True
        super().handle_exit(sig, frame)

    def _give_up(self) -> None:
        print(f"whale serve: the shutdown is not done {self.deadline_s:g} s after the signal; exiting. Where each "
              "thread was:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(1)


def log_requests(level: str) -> None:
    """whale's loggers (a line per request at INFO, errors) beside uvicorn's, in its format."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger = logging.getLogger("whale")
    logger.addHandler(handler)
    logger.setLevel(level.upper())


def _effort_budgets(text: str) -> dict[str, int | None]:
    budgets: dict[str, int | None] = {}
    for item in text.split(","):
        effort, _, value = item.partition("=")
        if effort.strip() not in REASONING_EFFORTS or not value:
            raise argparse.ArgumentTypeError(f"{item!r}: write EFFORT=N or EFFORT=none, EFFORT one of "
                                             f"{', '.join(REASONING_EFFORTS)}")
        budgets[effort.strip()] = None if value.strip() == "none" else int(value)
    return budgets


def build_router(args: argparse.Namespace) -> Router | None:
    if args.route == "off":
        if args.route_config is not None:
            raise InvalidRequestError("--route-config configures the route, which --route off turns off")
        return None
    default = True if args.route == "default" else None
    policy = load_policy(args.route_config, default) if args.route_config else RoutePolicy(default=default is True)
    return Router(policy)


def run(args: argparse.Namespace) -> int:
    import torch

    from whale.server.app import create_app, load_state, upstream_state
    from whale.server.routing import band_engines
    from whale.server.streaming import StreamTimings

    keys = tuple(args.api_key or ([os.environ["WHALE_API_KEY"]] if os.environ.get("WHALE_API_KEY") else []))
    router = build_router(args)
    upstream_key = args.upstream_api_key or os.environ.get("WHALE_UPSTREAM_API_KEY")
    common = {"router": router, "served_model_name": args.served_model_name, "chat_format": args.chat_format,
              "api_keys": keys, "protect_metrics": args.protect_metrics,
              "max_concurrent_requests": args.max_concurrent_requests, "max_request_bytes": args.max_request_bytes,
              "timings": StreamTimings(keepalive_s=args.keepalive)}
    with listen(args.host, args.port) as sock:
        set_threads(args.threads)
        if args.upstream:
            if args.speculative != "off" or args.kernels != "auto" or args.dtype != "auto" or args.device:
                raise InvalidRequestError("--speculative, --kernels, --dtype and --device choose how the local "
                                          "engine runs; with --upstream there is none: set them on the upstream")
            state = upstream_state(args.model, args.upstream, protocol=args.upstream_protocol,
                                   upstream_model=args.upstream_model, max_model_len=args.max_model_len,
                                   upstream_api_key=upstream_key,
                                   **common)
        else:
            state = load_state(args.model, dtype=args.dtype, device=args.device, kernels=args.kernels,
                               engine_options={"max_num_seqs": args.max_num_seqs, **engine_options(args)},
                               max_waiting=args.max_waiting, **common)
        if router is not None:
            state.band_engines = band_engines(router.policy, state.served, upstream_key)
        served = state.served
        served.thinking_budget = args.thinking_budget
        served.effort_budgets.update(args.effort_budgets or {})
        if args.min_answer_tokens is not None:
            served.min_answer_tokens = args.min_answer_tokens
        threads = torch.get_num_threads()
        drafts = "" if args.speculative == "off" else f", {args.speculative} drafts"
        engine = (f"generating on {', '.join(args.upstream)}" if args.upstream else
                  f"{state.served.kernels} kernels, {threads} thread{'s' if threads > 1 else ''}{drafts}")
        if router is not None:
            engine += ", route: deepseek-auto" + (" and requests that leave the mode" if router.policy.default else "")
        print(f"whale serve: {state.served.name} ({state.served.variant.name} chat format, context "
              f"{state.served.max_model_len}, {engine}) on "
              f"http://{args.host}:{args.port}"
              f"{' (API key required)' if keys else ''}; requests that leave sampling unset get "
              f"{state.served.defaults.describe()}", file=sys.stderr)
        log_requests(args.log_level)
        try:
            config = uvicorn.Config(create_app(state), log_level=args.log_level,
                                    timeout_graceful_shutdown=args.shutdown_timeout + 5)
            DrainingServer(config, state, args.shutdown_timeout, deadline_s=args.shutdown_timeout + 30).run(
                sockets=[sock])
        finally:
            state.shutdown()
    return 0
