"""Options of optimize: validation naming the argument, flat keywords routed to their class, one tolerance."""

from __future__ import annotations

import pytest
import torch
from idap_fx.passes import PASSES
from torch import nn

import idap_fx
from idap_fx.cli import _parser
from idap_fx.errors import BudgetError, OptionError
from idap_fx.optimize import resolve_options
from idap_fx.options import (
    TARGET_TOLERANCE,
    Goal,
    PruneOptions,
    Recovery,
    SkipOptions,
    split_shorthands,
)


def test_flat_keywords_reach_the_class_that_declares_them() -> None:
    goal, rec, passes = resolve_options(
        None,
        None,
        ("prune_channels", "skip_layers"),
        {"target_macs": 0.5, "budget": None, "distill_steps": 3, "round_to": 8, "skip_projection": True},
    )
    assert (goal.target_macs, goal.budget) == (0.5, None)
    assert rec.distill_steps == 3 and rec.compensation is True
    assert passes == [PruneOptions(round_to=8), SkipOptions(projection=True)]
    assert passes[1].candidate_kinds == ("residual", "identity", "projection")


def test_objects_and_names_mix_and_defaults_match() -> None:
    goal, rec, passes = resolve_options(Goal(target_params=0.4), Recovery(compensation=False), None, {})
    assert goal.target_params == 0.4 and not rec.compensation and passes == [PruneOptions()]
    _, _, passes = resolve_options(Goal(budget=0.1), None, [SkipOptions(max_skips=1), "prune_channels"], {})
    assert passes == [SkipOptions(max_skips=1), PruneOptions()]


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"target_mac": 0.5}, OptionError, "unknown option 'target_mac'; did you mean 'target_macs'"),
        ({"goal": Goal(), "target_macs": 0.5}, OptionError, "give target_macs inside goal= or as keywords"),
        ({"goal": Recovery()}, OptionError, "goal must be a Goal, got Recovery"),
        ({"passes": ["prune"]}, OptionError, r"unknown pass\(es\) \['prune'\]"),
        ({"passes": [3]}, OptionError, "passes must hold pass names or PassOptions objects, got 3"),
        ({"round_to": 0}, OptionError, "round_to must be an integer >= 1, got 0"),
        ({"min_channels": 1.5}, OptionError, "min_channels must be an integer >= 1, got 1.5"),
        ({"compensation": None}, OptionError, "compensation must be True, False or one of"),
        ({"compensation": "median"}, OptionError, "got 'median'"),
        ({"max_skips": -1}, OptionError, "max_skips must be an integer >= 0, got -1"),
        ({"distill_steps": 0}, OptionError, "distill_steps must be an integer >= 1, got 0"),
        ({"train_loader": "data/"}, OptionError, "train_loader must be None or an iterable"),
        ({"fine_tune": 3}, OptionError, "fine_tune must be None or a callable"),
        ({"importance": "l3"}, idap_fx.IdapError, "unknown importance 'l3'"),
        ({"schedule": "linear"}, idap_fx.IdapError, "unknown schedule 'linear'"),
        ({"target_latency": -1}, BudgetError, "target_latency must be a positive number of milliseconds"),
        ({"tolerance": 2}, OptionError, r"tolerance must be in \[0, 1\), got 2"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else None,
)
def test_bad_options_fail_before_any_work_naming_the_argument(kw, error, message) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(error, match=message):
        idap_fx.optimize(model, torch.randn(1, 3, 8, 8), quiet=True, **kw)


def test_options_of_a_pass_that_does_not_run_are_still_checked() -> None:
    with pytest.raises(OptionError, match="max_skips"):
        resolve_options(None, None, None, {"max_skips": "3"})
    _, _, passes = resolve_options(None, None, None, {"max_skips": 3})
    assert passes == [PruneOptions()]


def test_every_field_is_a_keyword_and_keywords_are_unique() -> None:
    classes = [Goal, Recovery, *(s.options_class for s in PASSES.values())]
    keys = [k for c in classes for k in c.shorthands()]
    assert len(keys) == len(set(keys))
    routed = split_shorthands(dict.fromkeys(keys), classes)
    assert sum(len(v) for v in routed.values()) == len(keys)
    assert {name for name, spec in PASSES.items() if spec.options_class.pass_name == name} == set(PASSES)


def test_one_tolerance_for_target_reached() -> None:
    goal = Goal(target_macs=0.5)
    assert goal.tolerance == TARGET_TOLERANCE == 0.01
    assert goal.reached(505, 1, 1000, 1) and not goal.reached(506, 1, 1000, 1)
    assert Goal(budget=0.1).reached(900, 900, 1000, 1000) is None


def test_cli_defaults_are_the_option_defaults() -> None:
    args = _parser().parse_args(["optimize", "torchvision:resnet18"])
    assert args.budget == Goal().budget and args.importance == PruneOptions().importance
    assert args.round_to == PruneOptions().round_to == 8  # one default: aligned widths for ONNX Runtime
    assert args.allocator == PruneOptions().allocator and args.min_keep == PruneOptions().min_keep
    assert args.passes == ["prune_channels"]


class _Opaque(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_report_holds_the_options_and_the_first_analysis_boundaries() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), _Opaque(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)
    )
    gm = idap_fx.trace(model, torch.randn(1, 3, 8, 8), leaf_modules=[_Opaque])
    res = idap_fx.optimize(gm, torch.randn(2, 3, 8, 8), budget=None, target_macs=0.8, quiet=True)
    opts = res.report.to_dict()["options"]
    assert opts["goal"]["target_macs"] == 0.8 and opts["goal"]["budget"] is None
    assert opts["passes"] == [{"name": "prune_channels"} | PruneOptions().to_dict()]
    assert opts["recovery"]["compensation"] is True
    assert res.report.frozen_ops == dict(idap_fx.analyze(res.original).boundaries)
    assert "module _Opaque" in res.report.frozen_ops["_1"]
