"""`whale chat`: an interactive, streaming conversation with a model in the terminal."""

from __future__ import annotations

import argparse
import signal
import sys

from whale.commands.generate import add_model_options, add_sampling_options, set_threads

HELP = "Type a message; Ctrl-C stops a reply, /reset starts over, /exit (or Ctrl-D) quits."
STOPPED = " [stopped]"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat")
    add_model_options(parser)
    parser.add_argument("--max-tokens", type=int, default=512, help="the longest reply, in tokens (default 512)")
    add_sampling_options(parser)
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.set_defaults(func=run)


def stream_reply(engine, prompt_ids: list[int], params, out=sys.stdout) -> str:
    """Run one request, writing text as it is decoded, and return the reply as shown. Ctrl-C stops it after the
    current step (the engine is never interrupted mid-step) and frees its blocks; the text so far is the reply."""
    request = engine.add_request(prompt_ids, params)
    stopped: list[int] = []  # the handler only records the signal; the loop below acts on it between steps
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stopped.append(signum))
    sent = ""
    try:
        while not request.status.finished and not stopped:
            engine.step()
            text = request.streamable_text()
            out.write(text[len(sent):])
            out.flush()
            sent = text
    finally:
        signal.signal(signal.SIGINT, previous)
    if stopped and not request.status.finished:
        engine.abort(request.request_id)
        out.write(STOPPED)
        return sent
    return request.text


def _sampling(params, args: argparse.Namespace, defaults) -> str:
    """What the replies are sampled with, and where the values not given as flags come from."""
    chosen = f"temperature {params.temperature:g}, top_p {params.top_p:g}"
    if args.temperature is not None and args.top_p is not None:
        return chosen
    return f"{chosen} (defaults from {defaults.source})"


def run(args: argparse.Namespace) -> int:
    from whale.llm import LLM

    set_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, kernels=args.kernels,
              max_model_len=args.max_model_len)
    params = llm.get_default_sampling_params(temperature=args.temperature, top_p=args.top_p,
                                             max_tokens=args.max_tokens)
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
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply = stream_reply(llm.engine, llm.tokenizer.encode(prompt, add_special_tokens=False), params)
        print()
        messages.append({"role": "assistant", "content": reply})
