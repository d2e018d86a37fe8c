"""GC across processes: DDP and FSDP2 (DTensor shards) on 2 CPU ranks with gloo.

One launch of tests/dist_worker.py on 2 ranks trains the same model on the same
global batch under DDP, under FSDP2 and in a single process, for every GC mode,
``attach`` with folded decay and ``attach(where="update")``, and layers that own
parameters and have children with parameters (MultiheadAttention,
TransformerEncoderLayer, LayerScale); a second launch (``--harness``) runs the
training harness under DDP and FSDP2 (GroupNorm, BatchNorm, an interrupted and
resumed run). The tests below judge what they saved.
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
from dist_worker import (  # tests/ is on sys.path
    LAYER_MODELS,
    LAYER_OPTIMIZERS,
    OPTIMIZERS,
    LayerScale,
    SelfAttention,
    harness_config,
)

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
    launch([str(WORKER), str(out)], WORLD, tmp, timeout=150)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the 2-rank training runs of ``dist_worker.HARNESS_RUNS``."""
    tmp = tmp_path_factory.mktemp("harness")
    launch([str(WORKER), "--harness", str(tmp)], WORLD, tmp, timeout=150)
    return tmp


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The harness's GroupNorm run in this one process (same seed, same global batch)."""
    from gradcent.experiments.datasets import build_dataset
    from gradcent.experiments.train import train_run

    out = tmp_path_factory.mktemp("one") / "run"
    data = build_dataset("digits", None, 200)
    train_run(harness_config("gn"), "gc", 0, out, data=data, log=None)
    return out


def _metrics(result: dict) -> list[dict]:
    # What the run computed; epoch_time and gc_time are measurements of the machine.
    keys = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")
    return [{k: row[k] for k in keys} for row in result["history"]]


def _run(folder: Path) -> tuple[dict, dict]:
    result = json.loads((folder / "result.json").read_text())
    return result, torch.load(folder / "checkpoint.pt", weights_only=False)


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
def test_train_fsdp_on_two_ranks_resumes_on_one(tmp_path: Path, harness: Path) -> None:
    from gradcent.cli import main
    from gradcent.experiments.datasets import build_dataset
    from gradcent.experiments.loaders import make_loader
    from gradcent.experiments.models import build_model
    from gradcent.experiments.train import evaluate

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
    final = torch.load(out / "checkpoint.pt", weights_only=False)
    assert final["epoch"] == 2
    # ... and continues the 2-rank run: epoch 2 in one process equals epoch 2 of
    # the uninterrupted 2-rank FSDP run (same data order at any world size).
    assert result["distributed"] == {"mode": "none", "world_size": 1}
    assert [r["world_size"] for r in result["history"]] == [WORLD, 1]
    two, two_ckpt = _run(harness / "fsdp-gn")
    for got, want in zip(_metrics(result), _metrics(two), strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    for key, t in two_ckpt["model"].items():
        torch.testing.assert_close(final["model"][key], t, rtol=1e-4, atol=1e-6, msg=key)


def test_unwrap_only_strips_ddp() -> None:
    from gradcent.experiments.distributed_run import DistRun

    inner = torch.nn.Linear(2, 2)
    wrapper = torch.nn.Module()
    wrapper.module = inner  # what DDP looks like from outside
    assert DistRun("ddp", 0, 2).unwrap(wrapper) is inner
    assert DistRun("fsdp", 0, 2).unwrap(wrapper) is wrapper
    assert DistRun().unwrap(inner) is inner


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp-gn", "fsdp-gn"])
def test_harness_two_ranks_equal_one_process(harness: Path, one_process: Path, name: str) -> None:
    # Same seed and global batch: the ranks together read the very batches one
    # process reads, so losses, accuracies and weights agree to float rounding.
    result, ckpt = _run(harness / name)
    ref, ref_ckpt = _run(one_process)
    assert result["distributed"] == {"mode": name.split("-")[0], "world_size": WORLD}
    assert ref["distributed"] == {"mode": "none", "world_size": 1}
    assert [row["world_size"] for row in result["history"]] == [WORLD, WORLD]
    got, want = _metrics(result), _metrics(ref)
    for row, ref_row in zip(got, want, strict=True):
        assert row == pytest.approx(ref_row, rel=1e-5, abs=1e-7)
    assert ckpt["model"].keys() == ref_ckpt["model"].keys()
    for key, t in ckpt["model"].items():
        torch.testing.assert_close(t, ref_ckpt["model"][key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
def test_fsdp_batchnorm_resume_is_exact(harness: Path) -> None:
    # Interrupted after epoch 1 and resumed on the same 2 ranks: bit for bit the
    # uninterrupted run, BatchNorm's running statistics and test metrics included.
    full, full_ckpt = _run(harness / "fsdp-bn")
    resumed, resumed_ckpt = _run(harness / "fsdp-bn-resumed")
    assert _metrics(resumed) == _metrics(full)
    assert resumed_ckpt["model"].keys() == full_ckpt["model"].keys()
    for key, t in full_ckpt["model"].items():
        assert torch.equal(resumed_ckpt["model"][key], t), key
    assert any("running_mean" in key for key in full_ckpt["model"])


@pytest.mark.slow
def test_sync_batchnorm_averages_the_ranks(harness: Path) -> None:
    check = torch.load(harness / "bn-sync.pt", weights_only=False)
    assert check["plain"]  # FSDP2 leaves buffers as plain per-rank tensors
    (m0, v0), (m1, v1) = check["before"]
    assert not torch.equal(m0, m1)  # each rank saw its own batch
    for mean, var in check["after"]:
        torch.testing.assert_close(mean, (m0 + m1) / 2)
        torch.testing.assert_close(var, (v0 + v1) / 2)


@pytest.mark.slow
@pytest.mark.parametrize("opt", LAYER_OPTIMIZERS)
@pytest.mark.parametrize("kind", LAYER_MODELS)
def test_fully_shard_model_on_layers_that_own_parameters(
    results: dict, kind: str, opt: str
) -> None:
    # nn.MultiheadAttention (in_proj_weight and its out_proj), TransformerEncoderLayer
    # and a LayerScale block under FSDP2: 3 gradcent steps equal one process.
    ref, got = results[(f"{kind}-ref", opt)], results[(f"{kind}-fsdp", opt)]
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("kind", LAYER_MODELS)
def test_gc_changed_the_layer_runs(results: dict, kind: str) -> None:
    ref, plain = results[(f"{kind}-ref", "sgd-all")], results[(f"{kind}-ref", "none")]
    in_proj = next(n for n in ref if n.endswith("in_proj_weight"))
    assert (ref[in_proj] - plain[in_proj]).abs().max().item() > 1e-3


def test_shard_units_keep_a_module_with_its_children() -> None:
    from torch import nn

    from gradcent.distributed import shard_units

    encoder = nn.TransformerEncoderLayer(8, 2, 16)
    block = LayerScale(8)
    attention = SelfAttention(8)
    net = nn.Sequential(encoder, block, attention, nn.ReLU(), nn.Linear(8, 2))
    units = shard_units(net)
    # The encoder layer owns nothing itself: its sublayers are units. MHA keeps
    # its out_proj (it reads out_proj.weight without calling out_proj) and the
    # LayerScale block its Linears.
    assert units == [
        encoder.self_attn,
        encoder.linear1,
        encoder.linear2,
        encoder.norm1,
        encoder.norm2,
        block,
        attention.mha,
        net[4],
    ]
    assert shard_units(nn.Sequential(net[4], net[4])) == [net[4]]  # shared: once


def test_bottom_up_orders_nested_leaves_and_names_a_stranger() -> None:
    from torch import nn

    from gradcent.distributed import _bottom_up

    block = LayerScale(8)
    net = nn.Sequential(block, nn.Linear(8, 2))
    assert _bottom_up(net, [block, net[1], block.fc1]) == [block.fc1, block, net[1]]
    with pytest.raises(ValueError, match="Linear is not a submodule of the model"):
        _bottom_up(net, [nn.Linear(2, 2)])


@pytest.mark.parametrize("world", [2, 4])
def test_global_order_does_not_depend_on_world_size(world: int) -> None:
    # Step k of N ranks taking b samples each reads the batch one process
    # reads at step k with batch N·b: the same samples, for every seed.
    from torch.utils.data import TensorDataset

    from gradcent.experiments.distributed_run import DistRun

    data = TensorDataset(torch.arange(24))
    for seed in (0, 7):
        one = list(DistRun().sampler(data, shuffle=True, seed=seed))
        assert sorted(one) == list(range(24)) and one != list(range(24))
        ranks = [
            list(DistRun("ddp", r, world).sampler(data, shuffle=True, seed=seed))
            for r in range(world)
        ]
        b = 3
        for k in range(24 // (b * world)):
            step = sorted(i for r in ranks for i in r[k * b : (k + 1) * b])
            assert step == sorted(one[k * b * world : (k + 1) * b * world])
    assert list(DistRun().sampler(data, shuffle=False, seed=0)) == list(range(24))


def test_one_process_keeps_the_order_it_always_had() -> None:
    # The order of DataLoader(shuffle=True, generator=g): runs recorded before the
    # ranks shared it (docs/RESULTS.md) are reproduced as they were.
    from torch.utils.data import DataLoader, TensorDataset

    from gradcent.experiments.distributed_run import DistRun

    data = TensorDataset(torch.arange(50))
    for seed in (0, 123_456_789_123):
        g = torch.Generator()
        g.manual_seed(seed)
        old = [
            int(i)
            for (batch,) in DataLoader(data, batch_size=7, shuffle=True, generator=g)
            for i in batch
        ]
        assert list(DistRun().sampler(data, shuffle=True, seed=seed)) == old


def test_rank_sampler_pads_with_the_first_samples() -> None:
    from gradcent.experiments.distributed_run import RankSampler, global_order

    order = global_order(5, shuffle=True, seed=3)
    ranks = [list(RankSampler(5, shuffle=True, seed=3, rank=r, world=2)) for r in range(2)]
    assert ranks == [order[0::2], [order[1], order[3], order[0]]]
    assert [list(RankSampler(1, shuffle=False, seed=0, rank=r, world=3)) for r in range(3)] == [
        [0],
        [0],
        [0],
    ]
    assert len(RankSampler(5, shuffle=True, seed=3, rank=1, world=2)) == 3
