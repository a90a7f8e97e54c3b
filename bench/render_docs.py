"""Render the figures in README.md and docs/*.md from ``bench/results/*.json``: docs cannot drift.

Every published table or figure sits between a marker pair::

    <!-- results:NAME:begin -->
    ...generated, never edited by hand...
    <!-- results:NAME:end -->

``NAME`` is ``FILE`` or ``FILE/KEY``: the entry ``KEY`` (default ``"main"``) of
``bench/results/FILE.json``, looked up in its ``"tables"`` (``{"columns": [...], "rows":
[[...], ...]}``, cells already formatted by the bench script) or its ``"markdown"``
(ready-made text: a multi-line block goes on its own lines, a one-line string stays inline,
so a single figure inside a sentence can be generated too). Bench scripts write these
files through ``bench/_results.py``.

    .venv/bin/python bench/render_docs.py           # rewrite the docs in place
    .venv/bin/python bench/render_docs.py --check   # exit 1 and list every docs table that drifted

``tests/docs/test_docs_results.py`` runs the check (re-rendered in memory), so a results file and
a docs table that disagree fail the default test suite.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MARKER = re.compile(r"<!-- results:([\w./-]+):begin -->(.*?)<!-- results:\1:end -->", re.S)
ANY_MARKER = re.compile(r"<!-- results:([\w./-]+):(begin|end) -->")


class DocsError(Exception):
    """A marker without its pair, or a name with no results entry."""


def docs_files(root: Path = ROOT) -> list[Path]:
    """The Markdown files whose figures are generated: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def markdown_table(columns: list[Any], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table; cells are written as given (the bench script formats them)."""
    lines = ["| " + " | ".join(str(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def entry(name: str, results: Path = RESULTS) -> str:
    """The rendered text for marker ``name`` (``FILE`` or ``FILE/KEY``)."""
    file, _, key = name.partition("/")
    path = results / f"{file}.json"
    if not path.is_file():
        raise DocsError(f"marker results:{name}: {_shown(path)} does not exist")
    data = json.loads(path.read_text())
    key = key or "main"
    if key in data.get("tables", {}):
        t = data["tables"][key]
        return "\n" + markdown_table(t["columns"], t["rows"]) + "\n"
    if key in data.get("markdown", {}):
        text = str(data["markdown"][key])
        return "\n" + text.strip("\n") + "\n" if "\n" in text.strip("\n") else text
    raise DocsError(f"marker results:{name}: {path.name} has no table or markdown entry {key!r}")


def render(text: str, where: str = "", results: Path = RESULTS) -> str:
    """``text`` with every marker pair's content regenerated; unpaired markers raise ``DocsError``."""
    stray = ANY_MARKER.search(MARKER.sub("", text))
    if stray:
        raise DocsError(f"{where}: marker {stray.group(0)} has no partner")

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        return f"<!-- results:{name}:begin -->{entry(name, results)}<!-- results:{name}:end -->"

    return MARKER.sub(sub, text)


def drifted(files: list[Path] | None = None, results: Path = RESULTS) -> list[str]:
    """Names ``file: marker`` whose docs text differs from what the results file renders."""
    out = []
    for path in files if files is not None else docs_files():
        text = path.read_text()
        fresh = render(text, path.name, results)
        if fresh != text:
            old = {m.group(1): m.group(2) for m in MARKER.finditer(text)}
            new = {m.group(1): m.group(2) for m in MARKER.finditer(fresh)}
            out += [f"{_shown(path)}: results:{k}" for k in old if old[k] != new.get(k)]
    return out


def main(argv: list[str] | None = None) -> int:
    """Rewrite the docs (or, with ``--check``, list drifts and return 1 if any)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a docs table drifted")
    args = p.parse_args(argv)
    if args.check:
        bad = drifted()
        print("\n".join(bad) if bad else "docs match bench/results")
        return 1 if bad else 0
    failed = 0
    for path in docs_files():
        text = path.read_text()
        try:
            fresh = render(text, path.name)
        except DocsError as exc:  # the other files are still rendered
            print(f"{_shown(path)} not updated: {exc}")
            failed = 1
            continue
        if fresh != text:
            path.write_text(fresh)
            print(f"updated {_shown(path)}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
