"""Every Python snippet in README.md and docs/*.md runs as written.

Each fenced ``python`` block is written to a file and run in its own process, in an
empty folder, with nothing but the environment a user has after ``make test``
(no ``KERAS_BACKEND``, no extra imports): a snippet must show its own imports and
the few lines of setup it needs. A block that is not meant to run is not fenced as
``python`` (use ``text`` or ``bash``). This keeps the docs from rotting: a renamed
function or argument fails here, not in a user's terminal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import free_port  # tests/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# An opening fence (any indent, as inside a list item), then everything up to the
# closing fence at the same indent.
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S
)


def snippets(text: str) -> list[tuple[int, str]]:
    """The python blocks of a markdown text, as (line number, dedented code)."""
    out = []
    for m in _FENCE.finditer(text):
        indent = len(m.group("indent"))
        lines = [
            line[indent:] if line[:indent].isspace() else line
            for line in m.group("body").splitlines()
        ]
        out.append((text.count("\n", 0, m.start()) + 2, "\n".join(lines) + "\n"))
    return out


def test_fence_parser_reads_indented_blocks_and_skips_others():
    text = "a\n```python\nx = 1\n```\n- item\n\n  ```python\n  y = 2\n  ```\n```bash\nls\n```\n"
    assert snippets(text) == [(3, "x = 1\n"), (8, "y = 2\n")]


CASES = [
    pytest.param(path, line, code, id=f"{path.name}:{line}")
    for path in DOCS
    for line, code in snippets(path.read_text(encoding="utf-8"))
]


def test_the_docs_have_snippets():
    # A guard for the parser: the README alone has several.
    assert sum(1 for c in CASES if c.values[0].name == "README.md") >= 3


@pytest.mark.slow
@pytest.mark.parametrize("path, line, code", CASES)
def test_snippet_runs(path: Path, line: int, code: str, tmp_path: Path):
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["PYTHONHASHSEED"] = "0"
    # The distributed snippets take MASTER_PORT from the environment (as under
    # torchrun) before their own fixed default: a free one, so that a port still
    # held by another process on this machine cannot fail them.
    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, f"{path.name}:{line}\n{code}\n{proc.stderr[-3000:]}"


RESULTS = ROOT / "docs" / "results"
RESULT_DIRS = sorted(p.name for p in RESULTS.glob("*") if (p / "results.json").is_file())


def test_results_are_committed():
    # The digits sections of docs/RESULTS.md at least; a guard for the glob.
    assert {"demo", "variants", "lr-sweep"} <= set(RESULT_DIRS)


@pytest.mark.experiments
@pytest.mark.parametrize("name", RESULT_DIRS)
def test_results_tables_are_what_report_prints(name: str):
    # docs/RESULTS.md holds each committed comparison's table exactly as
    # `gradcent report docs/results/<name>` prints it: a table typed by hand, or
    # one left behind when the statistics code changes, fails here.
    from gradcent.experiments.report import report_run

    table = report_run(RESULTS / name, command=False).strip()
    assert table in (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    if name == "demo":
        assert table in (ROOT / "README.md").read_text(encoding="utf-8")
