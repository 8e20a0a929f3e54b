"""The `whale` command: each subcommand lives beside the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from whale import __version__
from whale.errors import WhaleError

# name -> (module exposing `register(subparsers)`, one-line summary); imported lazily so `whale plan` and
# `whale --help` never import torch.
SUBCOMMANDS = {
    "generate": ("whale.commands.generate", "complete a prompt and print the text"),
    "chat": ("whale.commands.chat", "talk to a model in the terminal (its chat template, streamed)"),
    "models": ("whale.commands.models", "list the default model, cached and local files, architectures, chat formats"),
    "serve": ("whale.commands.serve", "serve a model over the DeepSeek API (OpenAI and Anthropic shapes)"),
    "plan": ("whale.planner.cli", "say what hardware a model needs, from its config alone"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whale", description="Inference and serving for DeepSeek models.")
    parser.add_argument("--version", action="version", version=f"whale {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the chosen subcommand's module is imported; the others get a stub entry for --help.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, summary) in SUBCOMMANDS.items():
        if name == chosen:
            importlib.import_module(module).register(subparsers)
            chosen_parser = subparsers.choices[name]
            chosen_parser.description = chosen_parser.description or summary[0].upper() + summary[1:] + "."
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WhaleError as exc:
        print(f"whale {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
