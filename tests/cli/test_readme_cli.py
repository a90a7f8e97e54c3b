"""The README's command-line examples, run exactly as written from a folder holding a small ``my_pkg``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cli_fixtures import MODELS, make_user_folder, shell

README = Path(__file__).parents[2] / "README.md"


def readme_cli_lines() -> list[str]:
    """The lines of the ```bash block under "## Command line"."""
    section = README.read_text().split("## Command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's Command line section has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_lists_the_cli_examples() -> None:
    lines = readme_cli_lines()
    assert len(lines) >= 5 and all(line.startswith("idap-fx ") for line in lines)


@pytest.mark.slow
def test_readme_cli_examples_run_as_written(tmp_path: Path) -> None:
    import torchvision

    user = make_user_folder(tmp_path / "work")
    scope: dict[str, object] = {}
    exec(MODELS, scope)
    torch.save(scope["build"]().state_dict(), user / "my_model.pt")  # type: ignore[operator]
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"  # a stand-in for the user's torch cache
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cache / "resnet18-f37072fd.pth")
    for line in readme_cli_lines():
        r = shell(line, cwd=user, env={"TORCH_HOME": str(tmp_path / "torch_home")})
        assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
    for name in ("model.onnx", "plan.json", "plan.html", "tuned.json", "smallest.onnx", "graph.html"):
        assert (user / name).exists(), name
