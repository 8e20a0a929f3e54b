"""`whale plan MODEL --gpu H200 ...`: what hardware a model needs and how to launch it."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from whale.errors import InvalidRequestError
from whale.planner.catalog import resolve_model
from whale.planner.gpus import GPUS, resolve_gpu
from whale.planner.memory import KV_DTYPES, WEIGHT_FORMATS
from whale.planner.plan import make_plan, plan_request
from whale.planner.report import render
from whale.planner.topology import REPLICA_ENGINES, topology_for, write_topology

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([km]?)\s*$", re.IGNORECASE)


def parse_tokens(text: str) -> int:
    """'131072', '128k' (x1024) or '1m' (x1024^2)."""
    match = _SIZE.match(text)
    if not match:
        raise InvalidRequestError(f"cannot read {text!r} as a token count (try 32768, 128k or 1m)")
    scale = {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        description="Count a model's parameters and KV cache from its config, find the smallest valid GPU layout "
                    "that holds it and the requested sequences, and print vLLM / SGLang launch commands.")
    parser.add_argument("model", help="catalog name (deepseek-v3, r1-distill-qwen-7b, ...), a config.json or "
                                      "checkpoint directory, or a hub id")
    parser.add_argument("--gpu", default="H100", help=f"accelerator: {', '.join(GPUS)} (default H100)")
    parser.add_argument("--gpus", type=int, help="evaluate exactly this many GPUs (default: the fewest that fit)")
    parser.add_argument("--context", help="tokens per sequence, e.g. 32768, 128k (default: the model's limit)")
    parser.add_argument("--concurrency", type=int, default=1, help="sequences held at once (default 1)")
    parser.add_argument("--dtype", choices=WEIGHT_FORMATS, help="weight format (default: the released one)")
    parser.add_argument("--kv-dtype", choices=tuple(KV_DTYPES), help="KV cache element type (default bf16; "
                                                                     "fp8 for V4)")
    parser.add_argument("--mtp", action="store_true", help="also load the MTP layer (speculative decoding)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs in one server (default 8)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--chart", metavar="FILE", help="draw the memory plan to FILE.png or FILE.svg")
    parser.add_argument("--emit", metavar="DIR", help="write the deployment to DIR: launch.sh (replicas, SGLang's "
                        "model gateway, whale's front) and, where a replica fits one host, docker-compose.yml")
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas behind the gateway (default 2)")
    parser.add_argument("--replica-engine", choices=REPLICA_ENGINES, default="sglang",
                        help="what runs each replica (default sglang; whale where the plan has a whale command)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    request = plan_request(resolve_model(args.model), resolve_gpu(args.gpu),
                           context=parse_tokens(args.context) if args.context else None,
                           concurrency=args.concurrency, dtype=args.dtype, kv_dtype=args.kv_dtype, gpus=args.gpus,
                           include_mtp=args.mtp, gpus_per_node=args.gpus_per_node)
    plan = make_plan(request)
    if args.chart:
        from whale.planner.chart import draw_chart

        draw_chart(plan, args.chart)
    print(json.dumps(plan.to_json(), indent=2) if args.json else render(plan))
    if args.emit:
        written = write_topology(topology_for(plan, args.replicas, args.replica_engine), Path(args.emit))
        print(f"\nwritten: {', '.join(str(path) for path in written)}", file=sys.stderr)
    return 0 if plan.fits else 1
