"""Published figures cannot drift: every results marker in README.md and docs/*.md re-renders unchanged.

``bench/render_docs.py`` regenerates the text between ``<!-- results:NAME:begin/end -->``
from ``bench/results/*.json``; here it runs in memory and must reproduce the files exactly.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rd = _bench_module("render_docs")
rm = _bench_module("render_matrix")  # the quality matrix's goal table (its own markers)


def test_docs_tables_match_their_results_files() -> None:
    assert rd.drifted() == [], "run: .venv/bin/python bench/render_docs.py"


def test_the_quality_matrix_goal_tables_match_their_results_file(tmp_path: Path) -> None:
    out = json.loads((ROOT / "bench/results/quality_matrix.json").read_text())
    assert rm.drifted(out) == [], "run: .venv/bin/python bench/render_matrix.py"
    doc = tmp_path / "README.md"
    doc.write_text(f"x\n{rm.BEGIN}{rm.END}\n")
    rm.update_docs(out, (doc,))
    assert rm.drifted(out, (doc,)) == [] and "| digits | 70% |" in doc.read_text()
    doc.write_text(doc.read_text().replace("| digits | 70% | ", "| digits | 70% | 1"))  # a hand edit
    assert rm.drifted(out, (doc,)) == [str(doc)]


def test_the_docs_do_use_generated_figures() -> None:
    names = {m.group(1) for p in rd.docs_files() for m in rd.MARKER.finditer(p.read_text())}
    assert {"demo", "scoring_overhead", "mobilenet_real", "quality", "peak_memory"} <= {
        n.split("/")[0] for n in names
    }, names


def test_a_changed_result_or_a_hand_edit_is_caught(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    data = {
        "tables": {"main": {"columns": ["model", "ratio"], "rows": [["a", "1.01×"]]}},
        "markdown": {"x": "7 %"},
    }
    (results / "r.json").write_text(json.dumps(data))
    doc = tmp_path / "doc.md"
    doc.write_text(
        "t\n<!-- results:r:begin --><!-- results:r:end -->\nsee <!-- results:r/x:begin -->?<!-- results:r/x:end -->\n"
    )
    doc.write_text(rd.render(doc.read_text(), results=results))
    assert "| a | 1.01× |" in doc.read_text() and "see <!-- results:r/x:begin -->7 %<" in doc.read_text()
    assert rd.drifted([doc], results) == []
    doc.write_text(doc.read_text().replace("1.01×", "1.33×"))  # a hand edit
    assert rd.drifted([doc], results) == [f"{doc.name}: results:r"]
    doc.write_text(rd.render(doc.read_text(), results=results))
    data["markdown"]["x"] = "8 %"  # a new result
    (results / "r.json").write_text(json.dumps(data))
    assert len(rd.drifted([doc], results)) == 1


def test_bad_markers_are_errors(tmp_path: Path) -> None:
    with pytest.raises(rd.DocsError, match="no partner"):
        rd.render("<!-- results:r:begin -->\n", "x.md", tmp_path)
    with pytest.raises(rd.DocsError, match="does not exist"):
        rd.render("<!-- results:nope:begin --><!-- results:nope:end -->", "x.md", tmp_path)
