"""Write a benchmark's results as ``bench/results/NAME.json`` (data + tables) and ``NAME.md``.

The JSON is the source of every published figure: ``bench/render_docs.py`` renders its
``tables`` / ``markdown`` entries into README.md and docs/*.md between
``<!-- results:NAME/KEY:begin -->`` / ``<!-- results:NAME/KEY:end -->`` markers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from render_docs import RESULTS, markdown_table


def table(columns: list[Any], rows: list[list[Any]]) -> dict[str, Any]:
    """A table entry: cells formatted as they are to be published."""
    return {"columns": [str(c) for c in columns], "rows": [[str(c) for c in r] for r in rows]}


def save(
    name: str,
    title: str,
    tables: dict[str, dict[str, Any]],
    *,
    markdown: dict[str, str] | None = None,
    intro: str = "",
    data: Any = None,
    results: Path = RESULTS,
) -> Path:
    """Write ``NAME.json`` (tables, markdown, raw data) and a readable ``NAME.md``; return the JSON path."""
    results.mkdir(parents=True, exist_ok=True)
    out = {"title": title, "intro": intro, "tables": tables, "markdown": markdown or {}, "data": data}
    path = results / f"{name}.json"
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    md = [f"# {title}", ""] + ([intro, ""] if intro else [])
    for t in tables.values():
        md += [markdown_table(t["columns"], t["rows"]), ""]
    md += [v.strip("\n") + "\n" for v in (markdown or {}).values() if "\n" in v.strip("\n")]
    (results / f"{name}.md").write_text("\n".join(md).rstrip("\n") + "\n")
    return path
