"""`whale chat`: an interactive, streaming conversation with a model in the terminal."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import TYPE_CHECKING, TextIO

from whale.chat.capabilities import REASONING_EFFORTS
from whale.commands.generate import add_model_options, add_sampling_options, engine_options, set_threads
from whale.errors import InvalidRequestError, WhaleError

if TYPE_CHECKING:
    from whale.chat import ChatDelta
    from whale.chat.conversation import ChatPrompt
    from whale.sampling_params import SamplingParams

HELP = "Type a message; Ctrl-C stops a reply, /reset starts over, /exit (or Ctrl-D) quits."
STOPPED = " [stopped]"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat")
    add_model_options(parser)
    parser.add_argument("--max-tokens", type=int, default=512, help="the longest reply, in tokens (default 512)")
    add_sampling_options(parser)
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--thinking", choices=("on", "off"), default=None,
                        help="thinking mode on models that have both (V3.1, V3.2, V4); default: the model's own")
    parser.add_argument("--thinking-budget", type=int, default=None,
                        help="at most this many reasoning tokens per reply, then the end of thinking is forced")
    parser.add_argument("--reasoning-effort", choices=tuple(REASONING_EFFORTS), default=None,
                        help="as the API's reasoning_effort (V4: the effort preamble; low and medium run as high, "
                             "xhigh as max); default high")
    parser.set_defaults(func=run)


class _ReplyWriter:
    """Writes a reply as its parser splits it: reasoning dimmed on a terminal, then a blank line, then the answer.
    Keeps the answer, which is what the conversation remembers (templates drop earlier turns' reasoning)."""

    def __init__(self, out: TextIO):
        self.out, self.answer, self.reasoned = out, "", False
        self.dim = ("\x1b[2m", "\x1b[0m") if out.isatty() else ("", "")

    def write(self, delta: ChatDelta) -> None:
        if delta.reasoning_content:
            self.out.write(self.dim[0] + delta.reasoning_content + self.dim[1])
            self.reasoned = True
        if delta.content:
            if self.reasoned and not self.answer:
                self.out.write("\n\n")
            self.out.write(delta.content)
            self.answer += delta.content
        self.out.flush()


def stream_reply(engine, prompt: ChatPrompt, params, out: TextIO = sys.stdout) -> str:
    """Run one request, writing the reply as it is decoded, and return its answer as shown. Ctrl-C stops it after
    the current step (the engine is never interrupted mid-step) and frees its blocks; the answer so far is kept."""
    request = engine.add_request(prompt.ids, params)
    writer = _ReplyWriter(out)
    stopped: list[int] = []  # the handler only records the signal; the loop below acts on it between steps
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stopped.append(signum))
    sent = ""
    try:
        while not request.status.finished and not stopped:
            engine.step()
            text = request.streamable_text()
            writer.write(prompt.parser.feed(text[len(sent):]))
            sent = text
    finally:
        signal.signal(signal.SIGINT, previous)
    if stopped and not request.status.finished:
        engine.abort(request.request_id)
        out.write(STOPPED)
        return writer.answer
    writer.write(prompt.parser.finish(request.text[len(sent):]))
    return writer.answer


def _sampling(params, args: argparse.Namespace, defaults) -> str:
    """What the replies are sampled with, and where the values not given as flags come from."""
    chosen = f"temperature {params.temperature:g}, top_p {params.top_p:g}"
    if args.temperature is not None and args.top_p is not None:
        return chosen
    return f"{chosen} (defaults from {defaults.source})"


def _budgeted(params: SamplingParams, prompt: ChatPrompt, budget: int | None) -> SamplingParams:
    """The reply's params with the reasoning budget, where the reply thinks."""
    if budget is None or prompt.reasoning is None:
        return params
    return dataclasses.replace(params, thinking_budget=budget, reasoning=prompt.reasoning)


def run(args: argparse.Namespace) -> int:
    from whale.chat.capabilities import resolve_thinking
    from whale.llm import LLM

    set_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, kernels=args.kernels, **engine_options(args))
    params = llm.get_default_sampling_params(temperature=args.temperature, top_p=args.top_p,
                                             max_tokens=args.max_tokens)
    if llm.chat_variant is None:
        raise InvalidRequestError(f"{llm.no_chat_reason}; `whale generate` completes plain text")
    thinking = None if args.thinking is None else args.thinking == "on"
    resolve_thinking(llm.chat_variant, thinking)  # a mode the model lacks: one line now, not at the first message
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    print(f"whale chat · {llm.loaded.files.reference} ({llm.loaded.files.path.name}) · sampling: "
          f"{_sampling(params, args, llm.generation_defaults)} · {HELP}", flush=True)
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: quit
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(base)
            print("(conversation cleared)")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt = llm.chat_prompt(messages, thinking=thinking, reasoning_effort=args.reasoning_effort)
            reply = stream_reply(llm.engine, prompt, _budgeted(params, prompt, args.thinking_budget))
        except WhaleError as exc:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"({exc}; /reset starts over)")
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": reply})
