"""The README's speed tables are the benchmarks' own output: `bench/X.py --publish` writes bench/results/X.md and
`python bench/report.py` copies it between the README's markers. One source, never edited by hand."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import report  # noqa: E402


def test_every_published_result_is_in_the_readme_exactly():
    blocks = report.readme_blocks(report.README.read_text())
    published = {f"bench/results/{path.name}" for path in report.RESULTS.glob("*.md")}
    assert published and set(blocks) == published
    for name, block in blocks.items():
        assert block == (report.ROOT / name).read_text(), f"{name} changed: run `python bench/report.py`"


def test_splicing_replaces_a_stale_table_and_nothing_else():
    name = sorted(report.readme_blocks(report.README.read_text()))[0]
    stale = f"Before.\n<!-- {name} -->\n| old | table |\n<!-- end -->\nAfter.\n"
    assert report.splice(stale) == f"Before.\n<!-- {name} -->\n{(report.ROOT / name).read_text()}<!-- end -->\nAfter.\n"
