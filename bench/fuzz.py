"""Fuzz whale's HTTP API with schemathesis, from the server's own /openapi.json: for every documented operation,
requests that fit the schema (positive) and requests it rules out (negative), each sent to a real server and its
answer checked: never a 5xx, a status and content type the route documents, a body that matches the documented
schema (the DeepSeek and Anthropic error shapes included), and every negative request refused with a 4xx.

    python bench/fuzz.py                      # 500 cases per operation and mode, on the server below
    python bench/fuzz.py --url http://127.0.0.1:8000 --examples 200   # any running whale server

Without --url it serves, in this process, a tiny random DeepSeek-V3.2 checkpoint with the real tokenizer and a
192-token context (tests/server/server_harness.py writes it), so that generation never dominates the run: the
routes, validation and error paths are what is fuzzed. Prints a table per operation and mode and the first
failures; exits 1 on any. tests/server/test_server_fuzz.py runs the same with fewer cases on every `make test`."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis
import hypothesis.errors
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@dataclass
class OperationRun:
    label: str
    mode: str
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def cases(self) -> int:
        return sum(self.statuses.values())


@dataclass
class FuzzReport:
    runs: list[OperationRun]
    seconds: float

    @property
    def cases(self) -> int:
        return sum(run.cases for run in self.runs)

    @property
    def failures(self) -> list[str]:
        return [f"{run.label} ({run.mode}): {failure}" for run in self.runs for failure in run.failures]

    @property
    def server_errors(self) -> int:
        return sum(count for run in self.runs for status, count in run.statuses.items() if status >= 500)

    def render(self) -> str:
        lines = [f"{'operation':<34} {'mode':<9} {'cases':>6} {'failed':>6}  statuses",
                 "-" * 90]
        for run in self.runs:
            statuses = " ".join(f"{status}:{count}" for status, count in sorted(run.statuses.items()))
            lines.append(f"{run.label:<34} {run.mode:<9} {run.cases:>6} {len(run.failures):>6}  {statuses}")
        lines.append(f"{self.cases} cases in {self.seconds:.0f} s; {self.server_errors} 5xx; "
                     f"{len(self.failures)} answers that broke a check")
        lines += [f"  FAIL {failure}" for failure in self.failures[:20]]
        return "\n".join(lines)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:400]


def fuzz_operation(operation, mode: GenerationMode, base_url: str, headers: dict[str, str], examples: int,
                   seed: int) -> OperationRun:
    run = OperationRun(operation.label, mode.value)

    @hypothesis.seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=120)
        run.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (Failure, FailureGroup) as exc:  # every broken check is recorded, and the run goes on
            run.failures.append(f"{case.method} {case.path} -> {response.status_code}: {_first_line(exc)}")

    try:
        send()
    except hypothesis.errors.Unsatisfiable:  # a GET without parameters: there is nothing to make invalid
        if mode is GenerationMode.POSITIVE or run.cases:
            raise
    return run


def run_fuzz(base_url: str, examples: int = 2000, seed: int = 0, headers: dict[str, str] | None = None,
             progress: bool = False) -> FuzzReport:
    """`headers`: sent with every request (the API key of a server that wants one); `progress`: a line on
    stderr as each operation and mode is done."""
    start = time.monotonic()
    headers = headers or {}
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=headers)
    runs = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            runs.append(fuzz_operation(operation, mode, base_url, headers, examples, seed))
            if progress:
                print(f"{runs[-1].label} ({mode.value}): {runs[-1].cases} cases, {time.monotonic() - start:.0f} s",
                      file=sys.stderr, flush=True)
    return FuzzReport(runs, time.monotonic() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: a tiny DeepSeek-V3.2 served in this process)")
    parser.add_argument("--api-key", help="the key of the server at --url, if it wants one")
    parser.add_argument("--examples", type=int, default=500, help="cases per operation and mode")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.url:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        report = run_fuzz(args.url, args.examples, args.seed, headers, progress=True)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
        from server_harness import FUZZ_ENGINE, serving, write_tiny_deepseek

        from whale.models.loader import load_model

        with tempfile.TemporaryDirectory() as directory:
            model = load_model(str(write_tiny_deepseek(Path(directory))), dtype="float32")
            with serving(model, engine_options=FUZZ_ENGINE) as (_, url):
                report = run_fuzz(url, args.examples, args.seed, progress=True)
    print(report.render())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
