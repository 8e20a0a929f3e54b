"""Benchmark results, kept in one place: a bench prints its table through a `Report`; with `--publish` the same
lines go to bench/results/NAME.md, stamped with the command, date and CPU; `python bench/report.py` copies every
results file into the README between its markers, `<!-- bench/results/NAME.md -->` ... `<!-- end -->`. The
README's speed tables are never edited by hand (tests/test_docs.py checks they equal the files)."""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
END = "<!-- end -->"


def add_publish_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--publish", action="store_true",
                        help="also write the result to bench/results/ (then `python bench/report.py` for the README)")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Report:
    """The lines a benchmark reports, printed as they come."""

    def __init__(self, name: str):
        self.name, self.lines = name, []

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def publish(self) -> Path:
        command = shlex.join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
        stamp = f"`{command.replace(' --publish', '')}` on {datetime.date.today()}, {_cpu()}:"
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{self.name}.md"
        path.write_text("\n".join([stamp, "", *self.lines]).strip() + "\n")
        print(f"written to {path.relative_to(ROOT)}; `python bench/report.py` puts it in the README")
        return path


def marker(path: Path) -> str:
    return f"<!-- {path.relative_to(ROOT)} -->"


def readme_blocks(text: str) -> dict[str, str]:
    """The README's published blocks: results file name -> the text between its markers."""
    pattern = re.compile(r"<!-- (bench/results/[\w.-]+\.md) -->\n(.*?)" + re.escape(END), re.S)
    return {match.group(1): match.group(2) for match in pattern.finditer(text)}


def splice(text: str) -> str:
    """`text` (the README) with every marked block replaced by its results file."""
    for name in readme_blocks(text):
        content = (ROOT / name).read_text()
        text = re.sub(re.escape(f"<!-- {name} -->\n") + r".*?" + re.escape(END),
                      lambda _, c=content, n=name: f"<!-- {n} -->\n{c}{END}", text, flags=re.S)
    return text


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    text = README.read_text()
    updated = splice(text)
    README.write_text(updated)
    print(f"README: {len(readme_blocks(updated))} result blocks, {'updated' if updated != text else 'unchanged'}")


if __name__ == "__main__":
    main()
