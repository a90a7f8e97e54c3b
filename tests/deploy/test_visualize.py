"""The dependency-graph viewer: page content (resnet18), DOT export, and the page rendered in headless Chromium (ResNet-50)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import MultiQueryHeads, random_plan
from torch.fx.passes.shape_prop import ShapeProp

import idap_fx
from idap_fx.deploy.visualize import to_dot, viewer_data, visualize
from idap_fx.errors import PlanError

X = torch.randn(1, 3, 224, 224)


def _traced(name: str) -> tuple[torch.fx.GraphModule, idap_fx.DependencyGraph]:
    gm = idap_fx.trace(torchvision.models.get_model(name, weights=None).eval(), X)
    return gm, idap_fx.analyze(gm)


@pytest.fixture(scope="module")
def r18() -> tuple[torch.fx.GraphModule, idap_fx.DependencyGraph]:
    return _traced("resnet18")


def _page_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="idap-data">(.*?)</script>', text, re.S)
    assert m, "the page carries no data block"
    return json.loads(m.group(1))


def test_page_has_every_node_coloured_by_group(r18, tmp_path):
    gm, dg = r18
    out = tmp_path / "r18.html"
    assert visualize(gm, out) == str(out)
    text = out.read_text(encoding="utf-8")
    data = _page_data(out)
    assert [n["name"] for n in data["nodes"]] == [n.name for n in gm.graph.nodes]
    assert len(data["edges"]) == sum(len(n.all_input_nodes) for n in gm.graph.nodes)
    colours = {g["id"]: g["colour"] for g in data["groups"]}
    assert set(colours) == {g.id for g in dg.groups}
    assert len(set(colours.values())) == len(colours), "two groups share a colour"
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours.values())
    by_name = {n["name"]: n for n in data["nodes"]}
    # a conv's output is its own group; BN and ReLU carry the same channels; the residual add joins groups
    assert by_name["layer1_0_conv1"]["group"] == by_name["layer1_0_relu"]["group"] == "layer1_0_conv1"
    assert by_name["layer1_0_conv2"]["group"] == by_name["add"]["group"] == "conv1"
    assert by_name["add"]["couples"] == ["conv1"]
    assert by_name["fc"]["shape"] == ["1×1000"]
    conv1 = next(g for g in data["groups"] if g["id"] == "conv1")
    assert {"add", "add_1"} <= set(conv1["couplers"])
    assert any(c[2] == ["add"] for c in conv1["couplings"])
    fc = next(g for g in data["groups"] if g["id"] == "fc")
    assert not fc["prunable"] and "graph output" in fc["frozen_reason"]
    # self-contained: nothing fetched at view time (the SVG namespace URI is not a fetch)
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:|@import|url\(\s*["']?https?:""", text)
    assert text.count("http") == text.count("http://www.w3.org/2000/svg")
    assert data["collapse_default"] == "none"  # 71 nodes: small enough to open expanded


def test_plan_and_scores_are_shown(r18, tmp_path):
    gm, dg = r18
    plan = random_plan(dg, ratio=0.5, seed=3)
    scores = {g.id: np.linspace(0.0, 1.0, g.size) for g in dg.prunable}
    scores["layer1_0_conv1"][0] = np.inf  # bn_scale gives +inf for groups without BN
    out = tmp_path / "plan.html"
    visualize((gm, dg), out, plan=plan, scores=scores)
    data = _page_data(out)
    assert data["has_plan"] and data["has_scores"]
    for g in data["groups"]:
        assert g["removed"] == sorted(plan.get(g["id"], []))
        group = dg.group(g["id"])
        assert g["removed_channels"] == sum(len(group.units[i]) for i in plan.get(g["id"], []))
        if g["id"] in scores:
            assert g["scores"] == [v if np.isfinite(v) else None for v in scores[g["id"]].tolist()]
        else:
            assert g["scores"] is None
    assert data["groups"][[g["id"] for g in data["groups"]].index("layer1_0_conv1")]["scores"][0] is None


def _shape_strings(meta: object) -> list[str]:
    if hasattr(meta, "shape"):
        return ["×".join(str(int(s)) for s in meta.shape)]
    if isinstance(meta, (list, tuple)):
        return [s for m in meta for s in _shape_strings(m)]
    return []


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_shapes_after_plan_match_the_pruned_model(name):
    gm, dg = _traced(name)
    plan = random_plan(dg, ratio=0.4, seed=1)
    data = viewer_data((gm, dg), plan=plan)
    small = idap_fx.prune(gm, plan, dg)
    ShapeProp(small).propagate(X)
    actual = {n.name: _shape_strings(n.meta.get("tensor_meta")) for n in small.graph.nodes}
    wrong = [
        (n["name"], n["after"], actual[n["name"]]) for n in data["nodes"] if n["after"] != actual[n["name"]]
    ]
    assert not wrong
    assert any(n["after"] != n["shape"] for n in data["nodes"])


def test_bad_inputs_are_refused(r18, tmp_path):
    gm, dg = r18
    with pytest.raises(PlanError, match="frozen"):
        visualize((gm, dg), tmp_path / "a.html", plan={"fc": [0]})
    with pytest.raises(PlanError, match="hold 3 values"):
        visualize((gm, dg), tmp_path / "a.html", scores={"conv1": [1.0, 2.0, 3.0]})
    with pytest.raises(PlanError, match="unknown group"):
        visualize((gm, dg), tmp_path / "a.html", scores={"nope": [1.0]})
    with pytest.raises(TypeError, match="GraphModule"):
        visualize(torchvision.models.resnet18(weights=None), tmp_path / "a.html")
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(r18, tmp_path, monkeypatch):
    gm, dg = r18
    out = tmp_path / "v.html"
    out.write_text("old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        visualize((gm, dg), out)
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["v.html"], "temporary file left behind"
    monkeypatch.undo()
    visualize((gm, dg), out)
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert stat.S_IMODE(out.stat().st_mode) & 0o044, "the page should be readable like any written file"


def test_dependency_graph_alone_gives_the_coupling_view(r18, tmp_path):
    _, dg = r18
    out = tmp_path / "dg.html"
    visualize(dg, out)
    data = _page_data(out)
    assert data["mode"] == "coupling"
    names = [n["name"] for n in data["nodes"]]
    assert {"conv1", "layer1_0_conv2", "layer1_1_conv2"} <= set(names)
    labelled = {(names[s], names[t]): label for s, t, label in data["edges"]}
    assert labelled[("conv1", "layer1_0_conv2")] == "add"


def test_blocks_and_default_collapse():
    gm, dg = _traced("resnet50")
    data = viewer_data((gm, dg))
    collapsed = [b for b in data["blocks"] if b["collapse"]]
    assert {b["type"] for b in collapsed} == {"Bottleneck"}
    assert len(collapsed) == 16
    assert data["collapse_default"] == "blocks"
    # the Sequential stages are blocks too (for the depth menu) but not "repeated blocks"
    assert {b["path"] for b in data["blocks"] if b["depth"] == 1} == {"layer1", "layer2", "layer3", "layer4"}
    assert not any(b["repeated"] for b in data["blocks"] if b["depth"] == 1)
    names = [n["name"] for n in data["nodes"]]
    block = next(b for b in data["blocks"] if b["path"] == "layer1.0")
    assert {names[i] for i in block["nodes"]} >= {
        "layer1_0_conv1",
        "layer1_0_downsample_0",
        "add",
        "layer1_0_relu_2",
    }
    assert data["nodes"][names.index("add")]["chain"][-1] == data["blocks"].index(block)


def test_to_dot(r18):
    gm, dg = r18
    plan = random_plan(dg, ratio=0.25)
    dot = to_dot((gm, dg), plan=plan)
    assert dot.startswith("digraph idap_fx {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    for n in gm.graph.nodes:
        assert f'"{n.name}" [label=' in dot
    assert dot.count(" -> ") == sum(len(n.all_input_nodes) for n in gm.graph.nodes)
    colours = viewer_data((gm, dg))["groups"]
    conv1 = next(g["colour"] for g in colours if g["id"] == "conv1")
    assert re.search(rf'"layer1_0_conv2" \[label="[^"]*group conv1 \(64\)[^"]*", fillcolor="{conv1}"', dot)
    assert f"-{len(plan['conv1'])}/64 units" in dot
    assert dot.count("subgraph") == len(viewer_data((gm, dg))["blocks"])
    if shutil.which("dot"):
        svg = subprocess.run(
            ["dot", "-Tsvg"], input=dot, capture_output=True, text=True, timeout=60, check=True
        )
        assert "<svg" in svg.stdout


# ---- the page in a real browser -------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium: found on PATH, else installed once with apt-get (root only); skip otherwise."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as root)")
    try:
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium"],
            capture_output=True,
            timeout=600,
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {exc}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get install chromium ran but no chromium binary is on PATH")
    return found


def _browse(chromium: str, page: Path, fragment: str, *flags: str) -> tuple[str, str]:
    """Run headless Chromium on ``page#fragment``; return (stdout, the console lines of stderr)."""
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,900",
            "--virtual-time-budget=4000",
            "--enable-logging=stderr",
            "--v=0",
            *flags,
            f"{page.as_uri()}#{fragment}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, "\n".join(console)


def _rendered(dom: str) -> tuple[int, list[str], list[str]]:
    assert '<body data-ready="1"' in dom, "the page script did not finish"
    errors = re.search(r'<html[^>]*data-errors="([^"]*)"', dom)
    assert errors is None, f"script errors: {errors.group(1)}"
    count = int(re.search(r'data-rendered="(\d+)"', dom).group(1))
    names = re.findall(r'<g [^>]*data-name="([^"]+)"', dom)
    blocks = re.findall(r'<g [^>]*data-block="([^"]+)"', dom)
    return count, names, blocks


def _not_blank(png: Path) -> None:
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1400, 900)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50, "the screenshot looks blank"


def test_resnet50_renders_in_chromium(chromium, tmp_path):
    gm, dg = _traced("resnet50")
    page = tmp_path / "resnet50.html"
    visualize((gm, dg), page, title="resnet50")
    data = _page_data(page)
    names = [n["name"] for n in data["nodes"]]

    dom, console = _browse(chromium, page, "collapse=none", "--dump-dom")
    assert not console, f"console output (errors?):\n{console}"
    count, drawn, blocks = _rendered(dom)
    assert count == len(drawn) == len(names) == 177 and not blocks
    assert sorted(drawn) == sorted(names)
    fills = dict(
        re.findall(r'data-name="([^"]+)" data-group="[^"]*"[^>]*><rect[^>]*fill="(#[0-9a-f]{6})"', dom)
    )
    colour = {g["id"]: g["colour"] for g in data["groups"]}
    assert fills["layer1_0_conv3"] == fills["add"] == colour["layer1_0_conv3"]

    dom, console = _browse(chromium, page, "", "--dump-dom")  # default: repeated blocks collapsed
    assert not console, console
    count, drawn, blocks = _rendered(dom)
    collapsed = [b for b in data["blocks"] if b["collapse"]]
    hidden = {i for b in collapsed for i in b["nodes"]}
    assert len(blocks) == len(collapsed) == 16
    assert count == len(names) - len(hidden) + len(collapsed)

    shot = tmp_path / "viewer.png"
    _, console = _browse(chromium, page, "", f"--screenshot={shot}")
    assert not console, console
    _not_blank(shot)


def test_resnet50_with_plan_in_chromium(chromium, tmp_path):
    gm, dg = _traced("resnet50")
    plan = random_plan(dg, ratio=0.4, seed=0)
    scores = {g.id: np.random.default_rng(0).random(g.size) for g in dg.prunable}
    page = tmp_path / "resnet50_plan.html"
    visualize((gm, dg), page, plan=plan, scores=scores, title="resnet50 + plan")
    fragment = "colour=plan&select=layer1_0_conv2"
    dom, console = _browse(chromium, page, fragment, "--dump-dom")
    assert not console, console
    count, drawn, _ = _rendered(dom)
    assert "layer1_0_conv2" in drawn  # selecting a node expands the block it sits in
    k = len(plan["layer1_0_conv2"])
    assert f"removes {k} of 64 units" in dom
    assert f"1×{64 - k}×56×56" in dom  # its shape after the plan
    assert 'class="scores"' in dom
    shot = tmp_path / "viewer_plan.png"
    _, console = _browse(chromium, page, fragment, f"--screenshot={shot}")
    assert not console, console
    _not_blank(shot)


def test_pinned_channels_are_shown(tmp_path):
    """Multi-query attention's one key / value head stays while the query heads are units: the page says so."""
    gm = idap_fx.trace(MultiQueryHeads((-2, -1)).eval(), torch.randn(2, 5, 8))
    out = tmp_path / "mqa.html"
    visualize(gm, out)
    (heads,) = [
        g for g in _page_data(out)["groups"] if any(m[1:3] == ["qkv.weight", 0] for m in g["members"])
    ]
    assert heads["prunable"] and heads["size"] == 4 and heads["channels"] == 12
    assert "broadcast against many" in heads["pinned_reason"]
