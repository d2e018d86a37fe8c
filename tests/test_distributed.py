"""GC across processes: DDP and FSDP2 (DTensor shards) on 2 CPU ranks with gloo.

One launch of tests/dist_worker.py on 2 ranks trains the same model on the same
global batch under DDP, under FSDP2 and in a single process, for every GC mode,
``attach`` with folded decay and ``attach(where="update")``; the tests below judge
what it saved.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import OPTIMIZERS  # the worker trains each of these (tests/ is on sys.path)

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("dist_worker.py")
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int, tmp: Path, timeout: float) -> None:
    """Start ``world`` ranks of ``python args`` with torchrun's env vars; fail with their logs."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        log = open(tmp / f"rank{rank}.log", "w+")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=log))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = ""
    for log in logs:
        log.seek(0)
        text += log.read()[-3000:]
        log.close()
    assert codes == [0] * world, f"ranks exited with {codes}:\n{text}"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("dist")
    out = tmp / "results.pt"
    launch([str(WORKER), str(out)], WORLD, tmp, timeout=110)
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ddp", "fsdp"])
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_parameters_equal_single_process(results: dict, how: str, opt: str) -> None:
    ref, got = results[("ref", opt)], results[(how, opt)]
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "opt", ["sgd-all", "sgd-conv", "sgd-fc", "adam-attach", "adamw-update", "adamw-fused"]
)
def test_gc_changed_the_run(results: dict, opt: str) -> None:
    # Otherwise the equality above would hold even if GC were skipped under DTensors.
    ref, plain = results[("ref", opt)], results[("ref", "none")]
    if opt.startswith("adam"):
        plain = results[("ref", "sgd-all")]  # another optimizer: only shows it ran
    diff = max((ref[n] - plain[n]).abs().max().item() for n in ref)
    assert diff > 1e-3


@pytest.mark.slow
def test_fused_equals_default(results: dict) -> None:
    ref, fused = results[("ref", "sgd-all")], results[("ref", "sgd-fused")]
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_shards_are_uneven_and_empty(results: dict) -> None:
    rows = results["rows"]
    # Linear(75, 3) splits 2 + 1, Linear(3, 1) leaves rank 1 with no row at all,
    # ConvTranspose (6, 1, 2, 2) in 3 groups of 2 rows splits group 1 across ranks.
    assert [r["5.weight"] for r in rows] == [2, 1]
    assert [r["7.weight"] for r in rows] == [1, 0]
    assert [r["2.weight"] for r in rows] == [3, 3]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("opt", "planned"),
    [
        ("sgd-all", {"0.weight", "2.weight", "5.weight", "7.weight"}),
        ("sgd-conv", {"0.weight", "2.weight"}),
        ("sgd-fc", {"5.weight", "7.weight"}),
        ("sgd-fused", {"0.weight", "2.weight", "5.weight", "7.weight"}),
    ],
)
def test_unit_means_zero_on_every_shard(results: dict, opt: str, planned: set) -> None:
    for rank, means in enumerate(results[("means", opt)]):
        assert set(means) == planned
        for name, m in means.items():
            assert m < 1e-5, (rank, name, m)


@pytest.mark.slow
def test_unit_means_not_zero_without_gc(results: dict) -> None:
    rank0 = results[("means", "none")][0]
    assert min(rank0.values()) > 1e-3


@pytest.mark.slow
def test_cross_shard_path_under_fsdp_shard1(results: dict) -> None:
    placements = results["shard1-placements"]
    assert all(p["0.weight"] == "(Shard(dim=1),)" for p in placements)
    ref, got = results[("ref", "sgd-all")], results[("fsdp-shard1", "sgd-all")]
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    for means in results[("means-shard1", "sgd-all")]:
        assert max(means.values()) < 1e-5


@pytest.mark.slow
def test_centralize_dtensor_matches_full_tensor(results: dict) -> None:
    errs = results["core"]
    assert len(errs) == 5 * 3 * 2 + 2 + 2
    bad = {k: v for k, v in errs.items() if v > (3e-2 if "bfloat16" in k else 1e-6)}
    assert not bad


@pytest.mark.slow
def test_gc_cost_under_fsdp(results: dict) -> None:
    # Shard(0): Conv2d and both Linears keep whole units per shard (no traffic);
    # the ConvTranspose (6, 1, 2, 2) in 3 groups all-reduces one float per unit.
    for rank, rows in enumerate(results["cost"]):
        by_name = {r.name: r for r in rows}
        assert set(by_name) == {"0.weight", "2.weight", "5.weight", "7.weight"}
        for name in ("0.weight", "5.weight", "7.weight"):
            assert (by_name[name].path, by_name[name].bytes) == ("local", 0), (rank, name)
        ct = by_name["2.weight"]
        assert (ct.path, ct.collectives, ct.floats, ct.bytes) == ("all-reduce", 1, 3, 12)
        assert ct.placements == "S(0)"
    # Shard(1) of the conv (6, 2, 3, 3): its 6 units span both shards.
    for rows in results["cost-shard1"]:
        conv = {r.name: r for r in rows}["0.weight"]
        assert (conv.path, conv.floats, conv.bytes) == ("all-reduce", 6, 24)


def test_gc_cost_dense_model_is_free() -> None:
    from gradcent.distributed import gc_cost

    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 1))
    rows = gc_cost(net, "conv")
    assert [(r.name, r.path, r.bytes) for r in rows] == [("0.weight", "dense", 0)]
    assert [r.name for r in gc_cost(net, "all")] == ["0.weight", "2.weight"]


def test_optimizer_state_round_trips_between_index_and_name_keys() -> None:
    from gradcent.experiments.distributed_run import by_index, by_name, param_names

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(
        [{"params": net[1].parameters()}, {"params": net[0].parameters()}], lr=0.1, momentum=0.9
    )
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    names = param_names(net, opt)
    assert names == ["1.weight", "1.bias", "0.weight", "0.bias"]
    state = opt.state_dict()
    named = by_name(state, names)
    assert named["param_groups"][1]["params"] == ["0.weight", "0.bias"]
    assert named["state"]["0.weight"]["momentum_buffer"] is state["state"][2]["momentum_buffer"]
    back = by_index(named, names)
    assert back["param_groups"] == state["param_groups"]
    assert back["state"].keys() == state["state"].keys()


def test_local_batch_and_setup_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradcent.experiments.distributed_run import DistRun, current, setup

    assert DistRun("ddp", 1, 4).local_batch(64) == 16
    with pytest.raises(ValueError, match="not divisible by the 3 ranks"):
        DistRun("fsdp", 0, 3).local_batch(64)
    with pytest.raises(ValueError, match="Invalid --distributed 'zero'"):
        setup("zero")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="needs torchrun"):
        setup("fsdp")
    assert setup("none") is current() and not current().active and current().is_main


def _digits_args(out: Path) -> list[str]:
    # GroupNorm: no running statistics, so every rank holds the very same model
    # and the 2-rank test metrics can be checked against one process exactly.
    return [
        "--dataset",
        "digits",
        "--subset",
        "200",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--norm",
        "gn",
        "--threads",
        "1",
        "--out",
        str(out),
    ]


@pytest.mark.slow
def test_train_fsdp_on_two_ranks_resumes_on_one(tmp_path: Path) -> None:
    from gradcent.cli import main
    from gradcent.experiments.datasets import build_dataset
    from gradcent.experiments.models import build_model
    from gradcent.experiments.train import evaluate, make_loader

    out = tmp_path / "run"
    launch(
        [
            "-m",
            "gradcent",
            "train",
            "--distributed",
            "fsdp",
            *_digits_args(out),
            "--stop-after",
            "1",
        ],
        WORLD,
        tmp_path,
        timeout=110,
    )
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and not (out / "result.json").exists()
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(WORLD)]
    assert "epoch 1/2" in logs[0] and "epoch 1/2" not in logs[1]  # rank 0 logs alone
    # The checkpoint is full and in torch's own format: a plain model loads it.
    data = build_dataset("digits", None, 200)
    model = build_model("smallcnn", data.num_classes, in_channels=data.in_channels, norm="gn")
    model.load_state_dict(ckpt["model"])
    assert set(ckpt["optimizer"]["state"]) == set(range(len(list(model.parameters()))))
    # Test metrics were averaged over the 2 ranks' halves (100 + 100 samples, no
    # padding): one process evaluating the whole test set finds the same numbers.
    one = evaluate(model, make_loader(data.test, 32, shuffle=False), torch.device("cpu"))
    row = ckpt["history"][0]
    assert row["test_acc"] == pytest.approx(one["test_acc"], abs=1e-9)
    assert row["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    # Resume on one process: epoch 2 runs from the 2-rank checkpoint.
    assert main(["train", *_digits_args(out), "--resume", "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and result["epochs"] == 2
    assert result["history"][0] == pytest.approx(row)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 2


def test_unwrap_only_strips_ddp() -> None:
    from gradcent.experiments.distributed_run import DistRun

    inner = torch.nn.Linear(2, 2)
    wrapper = torch.nn.Module()
    wrapper.module = inner  # what DDP looks like from outside
    assert DistRun("ddp", 0, 2).unwrap(wrapper) is inner
    assert DistRun("fsdp", 0, 2).unwrap(wrapper) is wrapper
    assert DistRun().unwrap(inner) is inner
