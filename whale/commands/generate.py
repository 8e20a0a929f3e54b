"""`whale generate "PROMPT"`: print one completion."""

from __future__ import annotations

import argparse
import sys

from whale.engine.proposers import SPECULATIVE_METHODS
from whale.errors import InvalidRequestError
from whale.generation_defaults import RULE
from whale.platform import WEIGHT_KERNELS


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="`default`, a .gguf file, a checkpoint directory or a Hugging Face hub id")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--kernels", default="auto", choices=("auto", *WEIGHT_KERNELS),
                        help="CPU linear kernels for GGUFs: auto picks hybrid on CPUs with bf16 hardware and blocks "
                             "(straight from the file's quantized blocks) on the others; blocks and int4 keep every "
                             "step's rows independent of the batch (docs/performance.md)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the model's math (default: torch's, one per physical core)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="cap the context (prompt + reply) below the model's own, in tokens")
    parser.add_argument("--speculative", default="off", choices=SPECULATIVE_METHODS,
                        help="speculative decoding: ngram drafts tokens by prompt lookup (copies of the prompt and "
                             "the reply so far; editing, extraction and rewriting gain most), mtp with a DeepSeek "
                             "checkpoint's multi-token-prediction layer; the replies are the same as without")
    parser.add_argument("--num-speculative-tokens", type=int, default=None,
                        help="draft tokens verified per step, 1-7 (default: 3 for ngram, 1 for mtp)")


def engine_options(args: argparse.Namespace) -> dict:
    """The EngineConfig fields the model options set."""
    return {"max_model_len": args.max_model_len, "speculative": args.speculative,
            "num_speculative_tokens": args.num_speculative_tokens}


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"0 is greedy; default: the model's. {RULE[0].upper()}{RULE[1:]}")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling; default: the model's")


def set_threads(threads: int | None) -> None:
    """Apply --threads (before the model loads: the kernels size their work by it)."""
    if threads is not None:
        import torch

        if threads < 1:
            raise InvalidRequestError(f"--threads {threads}: give at least 1")
        torch.set_num_threads(threads)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate")
    parser.add_argument("prompt", help="the text to complete")
    add_model_options(parser)
    parser.add_argument("--max-tokens", type=int, default=64, help="the longest completion, in tokens (default 64)")
    add_sampling_options(parser)
    parser.add_argument("--seed", type=int, default=None, help="a seed for reproducible sampling")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from whale.llm import LLM

    set_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, kernels=args.kernels, **engine_options(args))
    params = llm.get_default_sampling_params(temperature=args.temperature, top_p=args.top_p,
                                             max_tokens=args.max_tokens, seed=args.seed)
    if args.chat:
        output = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        output = llm.generate(args.prompt, params)[0]
    sys.stdout.write(output.outputs[0].text + "\n")
    return 0
