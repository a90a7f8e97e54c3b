"""The quality-matrix renderer: margins vs the best Torch-Pruning variant, pass/fail, generated docs blocks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import render_matrix  # noqa: E402


def _row(method: str, seed: int, one_shot: float, recovered: float) -> dict:
    return {"model": "digits", "target": 0.5, "method": method, "seed": seed, "macs_ratio": 0.5,
            "one_shot": one_shot, "recovered": recovered, "min_keep": 0.25, "min_width": 8}  # fmt: skip


ROWS = [
    _row("idap_fx", 0, 60.0, 90.0), _row("idap_fx", 1, 62.0, 92.0),
    _row("tp:global-l1", 0, 50.0, 95.0), _row("tp:global-l1", 1, 56.0, 95.0),
    _row("tp:uniform-l1", 0, 58.0, 80.0), _row("tp:uniform-l1", 1, 58.0, 82.0),
    _row("random", 0, 99.0, 99.0),
]  # fmt: skip


def test_margin_is_against_the_best_tp_variant_per_phase() -> None:
    (cell,) = render_matrix.goal_rows(ROWS)
    assert cell["one_shot"] == (61.0, "tp:uniform-l1", 58.0, 3.0)  # random is not a TP variant
    assert cell["one_shot_macs"] == (0.5, 0.5)
    assert cell["recovered"] == (91.0, "tp:global-l1", 95.0, -4.0)
    table = render_matrix.goal_table(ROWS)
    assert "+3.0 pass" in table and "-4.0 **fail**" in table


def test_docs_block_is_replaced_between_markers_only(tmp_path: Path) -> None:
    doc = tmp_path / "README.md"
    doc.write_text(f"intro\n{render_matrix.BEGIN}\nold table\n{render_matrix.END}\noutro\n")
    render_matrix.update_docs({"rows": ROWS, "configs": {}}, (doc,))
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "old table" not in text
    assert "| digits | 50% | 61.0 |" in text
    render_matrix.update_docs({"rows": ROWS, "configs": {}}, (doc,))
    assert doc.read_text() == text  # idempotent


def test_docs_without_markers_are_refused(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="add the markers"):
        render_matrix.update_docs({"rows": ROWS, "configs": {}}, (doc,))
    assert doc.read_text() == "no markers\n"
