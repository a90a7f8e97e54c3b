"""torch.distributed: 2 CPU processes (gloo, localhost) behave like one process over all the data.

Each rank holds half of the calibration batches. Checked against a single process over
all batches: scores, the label-free budget, the pruning plan of ``optimize``, and the
model ``optimize`` returns for a small ResNet-18 (same parameter count, same weights to
1e-6, with and without a budget: held-out batches are chosen by global index); then that
only rank 0 writes the output, that DDP distillation keeps the ranks' weights identical,
that a barrier fails with the late rank named, and that a rank raising mid-run stops the
other one promptly with a clear error and no output file.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import pickle
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import random_plan, rel_err, state_hash
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import BasicBlock

import idap_fx
from idap_fx.distributed import (
    all_sum,
    barrier,
    check_same,
    fail_fast,
    is_distributed,
    is_main,
    main_output,
    rank,
    world_size,
)
from idap_fx.method.budget import Budget
from idap_fx.method.channel_stats import UnitIndex, find_sites
from idap_fx.method.recovery import distill
from idap_fx.metrics import count_params

WORLD = 2
# Every rank gets its own hash seed, as under torchrun: site order must not depend on it.
HASH_SEEDS = {"main": ("0", "1"), "fail": ("1", "0")}
PG_TIMEOUT = 60.0  # a hang would show as ~this long; fail-fast must be far quicker
JOIN_TIMEOUT = 240.0


class Net(nn.Module):
    """Conv-BN-ReLU stem, a strided block and a residual block, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(x)))
        y = y + F.relu(self.b3(self.c3(y)))
        return self.fc(y.mean((2, 3)))


class SmallResNet18(nn.Module):
    """ResNet-18's layout (4 stages of 2 basic blocks, strided 1×1 shortcuts) at widths 8–64."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        blocks, c_in = [], 8
        for c, stride in ((8, 1), (16, 2), (32, 2), (64, 2)):
            down = None
            if stride != 1 or c_in != c:
                down = nn.Sequential(nn.Conv2d(c_in, c, 1, stride=stride, bias=False), nn.BatchNorm2d(c))
            blocks += [BasicBlock(c_in, c, stride, down), BasicBlock(c, c)]
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def _resnet() -> nn.Module:
    torch.manual_seed(5)
    m = SmallResNet18()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so channels differ in importance
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.2, 1.5)
        m.fc.bias.zero_()  # the output then depends on the features alone
    return m.eval()


def _resnet_batches() -> list[torch.Tensor]:
    """4 calibration batches: rank r gets global batches 2r, 2r + 1."""
    g = torch.Generator().manual_seed(6)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(4)]


RESNET_RUNS = {  # the budgets bind: several steps are rolled back on the held-out batch's deviation
    "no_budget": {"budget": None},  # allocator auto: sensitivity's probes, the selection and the probe
    # distillation use global batches 0-1 (rank 0's) and select on 2-3 (rank 1's)
    "pooled": {"budget": 5e-5, "compensation": False, "allocator": "group"},
    "max": {"budget": 5e-5, "budget_reduce": "max", "compensation": False, "allocator": "group"},
}


def _resnet_run(batches: list[torch.Tensor], options: dict[str, Any]) -> dict[str, Any]:
    res = idap_fx.optimize(
        _resnet(), _example(), calibration=batches, target_macs=0.5, quiet=True, strict=False, **options
    )
    return {
        "params": res.report.params_after,
        "consumed": res.report.budget_consumed,
        "state": {k: v.clone() for k, v in res.model.state_dict().items()},
    }


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def _example() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _all_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(8)]


def _shard(r: int) -> list[torch.Tensor]:
    """Rank ``r``'s contiguous half (optimize's held-out batches are chosen by global index)."""
    per = len(_all_batches()) // WORLD
    return _all_batches()[r * per : (r + 1) * per]


def _plan_of(res: idap_fx.OptimizeResult) -> dict[str, Any]:
    return {
        "steps": [(s["groups"], s["units_removed"], s["accepted"]) for s in res.report.steps],
        "shapes": {k: tuple(v.shape) for k, v in res.model.state_dict().items()},
    }


def _fixed_plan() -> tuple[Any, Any, Any]:
    gm = idap_fx.trace(_net(), _example())
    dg = idap_fx.analyze(gm)
    return gm, dg, idap_fx.prune(gm, random_plan(dg, 0.4, seed=3), dg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(r: int, port: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=r,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT),
    )


def _outcome(fn: Any) -> dict[str, Any]:
    try:
        return {"value": fn()}
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc), "at": time.time()}


# ---------------------------------------------------------------- the ranks' work


def _main_job(r: int, out_dir: Path) -> dict[str, Any]:
    got: dict[str, Any] = {"rank": rank(), "world": world_size(), "distributed": is_distributed()}
    gm = idap_fx.trace(_net(), _example())
    dg = idap_fx.analyze(gm)
    got["scores"] = idap_fx.score(gm, dg, _shard(r))
    ref, _, pruned = _fixed_plan()
    got["deviation"] = Budget(ref, 0.05, _shard(r)).deviation(pruned)

    res = idap_fx.optimize(
        _net(), _example(), calibration=_shard(r), target_macs=0.6, budget=None, quiet=True
    )
    got["plan"] = _plan_of(res)
    got["hash"] = state_hash(res.model)
    per = len(_resnet_batches()) // WORLD
    mine = _resnet_batches()[r * per : (r + 1) * per]
    got["resnet"] = {name: _resnet_run(mine, opts) for name, opts in RESNET_RUNS.items()}
    with torch.no_grad():
        got["output"] = res.model(_example())
    check_same(got["plan"], "the pruning plan")

    with main_output(out_dir / "model.pt") as tmp:
        got["writer"] = tmp is not None
        if tmp is not None:
            torch.save({"rank": rank(), "shapes": got["plan"]["shapes"]}, tmp)
    got["files_after_write"] = sorted(os.listdir(out_dir))

    def write_while_rank1_fails() -> None:
        with main_output(out_dir / "never.pt") as tmp:
            if tmp is not None:
                torch.save({"rank": rank()}, tmp)
            if rank() == 1:
                raise ValueError("rank 1 fails during the write")

    got["failed_write"] = _outcome(write_while_rank1_fails)
    barrier(timeout=30.0)  # both ranks are past the write before either looks
    got["files_after_failed_write"] = sorted(os.listdir(out_dir))

    # different images on each rank: identical weights afterwards can only come from averaged gradients
    data = TensorDataset(torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(4 + r)))
    tuned = idap_fx.optimize(
        _net(),
        _example(),
        calibration=_shard(r),
        target_macs=0.6,
        budget=None,
        quiet=True,
        train_loader=DataLoader(data, batch_size=4),
        distill_steps=2,
    )
    hashes: list[Any] = [None] * world_size()
    dist.all_gather_object(hashes, state_hash(tuned.model))
    got["ddp_hashes"], got["ddp_plan"] = hashes, _plan_of(tuned)
    got["ddp_recovery"] = [(r["steps"], r["kept_step"]) for r in tuned.report.recovery]
    # The held-out guard may keep the starting weights; distil once more without it, so the weights
    # must move, and identical results on both ranks can only come from averaged gradients.
    student = copy.deepcopy(tuned.model)
    distill(student, tuned.model, DataLoader(data, batch_size=4), steps=2, lr=1e-2)
    moved: list[Any] = [None] * world_size()
    dist.all_gather_object(moved, (state_hash(tuned.model), state_hash(student)))
    got["ddp_moved"] = moved

    t0 = time.time()
    if rank() == 1:
        time.sleep(3.0)  # late: rank 0's barrier must give up after 1 s and name rank 1
    got["late_barrier"] = _outcome(lambda: barrier(timeout=1.0 if rank() == 0 else 5.0, what="test"))
    got["late_barrier_s"] = time.time() - t0
    return got


def _failing_job(r: int, fail_rank: int, out_dir: Path) -> dict[str, Any]:
    calls = 0
    failed_at = None

    def fine_tune(model: nn.Module, teacher: nn.Module) -> nn.Module:
        nonlocal calls, failed_at
        calls += 1
        if r == fail_rank and calls == 2:  # mid-run: one full pruning step (with collectives) done
            failed_at = time.time()
            raise ValueError(f"boom on rank {fail_rank}")
        return model

    def job() -> None:
        with fail_fast(grace=10.0):
            res = idap_fx.optimize(
                _net(),
                _example(),
                calibration=_shard(r),
                target_macs=0.3,
                budget=None,
                quiet=True,
                fine_tune=fine_tune,
            )
            with main_output(out_dir / "model.pt") as tmp:
                if tmp is not None:
                    torch.save(res.model.state_dict(), tmp)

    got = _outcome(job)
    got["failed_at"], got["calls"] = failed_at, calls
    return got


def _worker(r: int, ports: list[int], out_dir: str, scenario: str) -> None:
    """One rank: run the scenario's jobs, each in a fresh process group, and pickle what it saw."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    out = Path(out_dir)
    gm = idap_fx.trace(_net(), _example())
    dg = idap_fx.analyze(gm)
    results: dict[str, Any] = {"sites": [(s.node, s.dims) for s in find_sites(gm, dg, UnitIndex(dg))]}
    for job, port in zip(range(len(ports)), ports, strict=True):
        _init(r, port)
        sub = out / f"{scenario}{job}"
        sub.mkdir(exist_ok=True)
        if scenario == "main":
            results[job] = _outcome(lambda sub=sub: _main_job(r, sub))
        else:
            results[job] = _failing_job(r, job, sub)  # job k: rank k raises
        if is_distributed():  # a survivor's group is broken but still registered
            dist.destroy_process_group()
    with open(out / f"{scenario}_rank{r}.pkl", "wb") as f:
        pickle.dump(results, f)


def _spawn(scenario: str, n_jobs: int, out_dir: Path) -> list[Any]:
    """Start WORLD processes (ours, joined by ``_collect``), with the scenario's hash seeds."""
    ctx = mp.get_context("spawn")
    ports = [_free_port() for _ in range(n_jobs)]
    procs = [ctx.Process(target=_worker, args=(r, ports, str(out_dir), scenario)) for r in range(WORLD)]
    saved = os.environ.get("PYTHONHASHSEED")
    try:
        for p, seed in zip(procs, HASH_SEEDS[scenario], strict=True):
            os.environ["PYTHONHASHSEED"] = seed  # a spawned child starts with the current environment
            p.start()
    finally:
        if saved is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = saved
    return procs


def _collect(procs: list[Any], scenario: str, out_dir: Path) -> list[dict[str, Any]]:
    deadline = time.time() + JOIN_TIMEOUT
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"{scenario}: ranks {hung} hung (killed after {JOIN_TIMEOUT} s)"
    assert all(p.exitcode == 0 for p in procs), (scenario, [p.exitcode for p in procs])
    results = []
    for r in range(WORLD):
        with open(out_dir / f"{scenario}_rank{r}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both 2-rank runs at once, and the single-process reference over all batches meanwhile."""
    out = tmp_path_factory.mktemp("distributed")
    procs = {"main": _spawn("main", 1, out), "fail": _spawn("fail", WORLD, out)}
    try:
        gm = idap_fx.trace(_net(), _example())
        dg = idap_fx.analyze(gm)
        ref, _, pruned = _fixed_plan()
        single = idap_fx.optimize(
            _net(), _example(), calibration=_all_batches(), target_macs=0.6, budget=None, quiet=True
        )
        with torch.no_grad():
            reference = {
                "scores": idap_fx.score(gm, dg, _all_batches()),
                "deviation": Budget(ref, 0.05, _all_batches()).deviation(pruned),
                "plan": _plan_of(single),
                "output": single.model(_example()),
                "resnet": {name: _resnet_run(_resnet_batches(), opts) for name, opts in RESNET_RUNS.items()},
            }
    finally:
        results = {name: _collect(p, name, out) for name, p in procs.items()}
    return results | {"reference": reference, "dir": out}


# ---------------------------------------------------------------- tests


def test_two_ranks_give_the_single_process_scores_plan_and_budget(runs: dict[str, Any]) -> None:
    ref = runs["reference"]
    for r, res in enumerate(runs["main"]):
        assert "value" in res[0], f"rank {r} raised {res[0].get('error')}: {res[0].get('message')}"
    got = [res[0]["value"] for res in runs["main"]]
    assert [g["rank"] for g in got] == [0, 1] and all(g["world"] == WORLD and g["distributed"] for g in got)

    # scores: all-reduced sums over half the batches each == one process over all of them
    for g in got:
        assert g["scores"].keys() == ref["scores"].keys()
        for gid, want in ref["scores"].items():
            err = np.max(np.abs(g["scores"][gid] - want) / np.abs(want))
            assert err <= 1e-6, (gid, err)
    for gid in ref["scores"]:  # and bit-identical across ranks, so both make the same choices
        assert np.array_equal(got[0]["scores"][gid], got[1]["scores"][gid]), gid

    # label-free budget: numerator and denominator summed over ranks
    assert ref["deviation"] > 1e-3
    for g in got:
        assert g["deviation"] == pytest.approx(ref["deviation"], rel=1e-9)

    # optimize: the same plan on both ranks, and the single-process one
    assert len(ref["plan"]["steps"]) >= 2
    assert got[0]["plan"] == got[1]["plan"] == ref["plan"]
    assert got[0]["hash"] == got[1]["hash"]
    for g in got:
        assert rel_err(g["output"], ref["output"]) < 1e-5


def test_two_ranks_return_the_single_process_model(runs: dict[str, Any]) -> None:
    """Same parameter count and weights to 1e-6 as one process over all 4 batches, budget on or off."""
    ref = runs["reference"]["resnet"]
    for name, want in ref.items():
        assert want["params"] < 0.9 * count_params(_resnet()), name  # it did prune
        if RESNET_RUNS[name]["budget"] is None:
            assert math.isnan(want["consumed"]), name  # nothing withheld, nothing measured
        else:
            assert 0 < want["consumed"] <= RESNET_RUNS[name]["budget"], name
        for r, res in enumerate(runs["main"]):
            got = res[0]["value"]["resnet"][name]
            assert got["params"] == want["params"], (name, r)
            assert got["state"].keys() == want["state"].keys(), (name, r)
            for k, v in want["state"].items():
                assert got["state"][k].shape == v.shape, (name, r, k)
                assert torch.allclose(got["state"][k].double(), v.double(), rtol=0, atol=1e-6), (name, r, k)
            if not math.isnan(want["consumed"]):
                assert got["consumed"] == pytest.approx(want["consumed"], rel=1e-9), (name, r)


def test_only_rank_0_writes_and_a_failed_write_leaves_nothing(runs: dict[str, Any]) -> None:
    got = [res[0]["value"] for res in runs["main"]]
    assert [g["writer"] for g in got] == [True, False]
    saved = torch.load(runs["dir"] / "main0" / "model.pt", weights_only=True)
    assert saved["rank"] == 0 and saved["shapes"] == got[0]["plan"]["shapes"]
    assert got[0]["files_after_write"] == ["model.pt"]  # rank 0 moves on first: it has the file
    # rank 1 raising inside the block: both ranks raise, no file appears, no temporary is left
    assert got[0]["failed_write"]["error"] == "DistributedError"
    assert "rank 1: ValueError: rank 1 fails during the write" in got[0]["failed_write"]["message"]
    assert got[1]["failed_write"]["error"] == "ValueError"
    assert got[0]["files_after_failed_write"] == got[1]["files_after_failed_write"] == ["model.pt"]


def test_ddp_fine_tuning_keeps_ranks_identical(runs: dict[str, Any]) -> None:
    got = [res[0]["value"] for res in runs["main"]]
    for g in got:  # each rank trained on its own images; DDP averaged the gradients
        assert g["ddp_hashes"][0] == g["ddp_hashes"][1]
        assert g["ddp_plan"]["shapes"] == got[0]["ddp_plan"]["shapes"]
        # every recovery ran its steps and both ranks kept the same step (the held-out measure is summed)
        assert g["ddp_recovery"] and all(steps for steps, _ in g["ddp_recovery"])
        assert g["ddp_recovery"] == got[0]["ddp_recovery"]
        (before0, after0), (before1, after1) = g["ddp_moved"]
        assert before0 == before1 and after0 == after1  # identical across ranks after unguarded distillation
        assert after0 != before0  # and it did train


def test_a_late_rank_fails_the_barrier_by_name(runs: dict[str, Any]) -> None:
    got = runs["main"][0][0]["value"]
    assert got["late_barrier"]["error"] == "DistributedError", got["late_barrier"]
    assert "Ranks 1 failed" in got["late_barrier"]["message"]
    assert got["late_barrier_s"] < 2.5


def test_a_rank_that_raises_stops_the_other_promptly_without_output(runs: dict[str, Any]) -> None:
    for fail_rank in range(WORLD):
        survivor = 1 - fail_rank
        failed, other = runs["fail"][fail_rank][fail_rank], runs["fail"][survivor][fail_rank]
        assert failed["error"] == "IdapError" and f"boom on rank {fail_rank}" in failed["message"], failed
        assert failed["failed_at"] is not None and failed["calls"] == 2
        assert other["error"] == "DistributedError", other
        assert f"rank {fail_rank} failed with IdapError" in other["message"]
        assert f"boom on rank {fail_rank}" in other["message"]
        assert f"rank {survivor} stopped too" in other["message"]
        assert other["at"] - failed["failed_at"] < 15.0  # fail-fast, not the 60 s group timeout
        assert os.listdir(runs["dir"] / f"fail{fail_rank}") == []  # no output, no temporaries


def test_calibration_sites_do_not_depend_on_the_hash_seed(runs: dict[str, Any]) -> None:
    assert runs["main"][0]["sites"] == runs["fail"][0]["sites"]  # hash seeds 0 and 1


def test_single_process_helpers_are_plain(tmp_path: Path) -> None:
    assert not is_distributed() and rank() == 0 and world_size() == 1 and is_main()
    barrier(timeout=0.1)
    check_same({"a": [1]}, "anything")
    assert all_sum([1, 2.5]) == [1.0, 2.5]
    with main_output(tmp_path / "out.bin") as tmp:
        assert tmp is not None and Path(tmp).parent == tmp_path
        Path(tmp).write_bytes(b"ok")
    assert (tmp_path / "out.bin").read_bytes() == b"ok"
    with pytest.raises(ValueError, match="half-written"), main_output(tmp_path / "bad.bin") as tmp:
        Path(tmp).write_bytes(b"partial")
        raise ValueError("half-written")
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]
    with pytest.raises(KeyError), fail_fast():
        raise KeyError("unchanged when not distributed")
