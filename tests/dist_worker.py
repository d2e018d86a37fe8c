"""One rank of the distributed GC checks, launched twice by tests/test_distributed.py.

Run as ``python tests/dist_worker.py OUT_FILE`` (or ``--harness OUT_DIR`` for the
training harness runs) with RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT set (gloo, CPU). Every scenario trains the same small model on the
same global batch under DDP and FSDP2 and, on rank 0, in a single process; rank 0
saves all parameters and per-shard statistics to OUT_FILE for the test to judge.
Nothing is asserted here: the test process does the asserting.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcent
from gradcent.distributed import fully_shard_model, gc_cost

# SGD runs whose momentum buffers are checked for zero unit means ("none": a control).
MEANS_MODE = {
    "sgd-all": "all",
    "sgd-conv": "conv",
    "sgd-fc": "fc",
    "sgd-fused": "all",
    "none": "all",
}
STEPS = 3
GLOBAL_BATCH = 8
OPTIMIZERS = (
    "sgd-all",
    "sgd-conv",
    "sgd-fc",
    "adam-attach",
    "adamw-update",
    "none",
    "sgd-fused",
    "adamw-fused",
)


def make_model() -> nn.Sequential:
    """Conv (even shards), grouped ConvTranspose (units span dim 0), Linear(75, 3)
    (uneven shards on 2 ranks) and Linear(3, 1) (an empty shard on rank 1)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3),
        nn.Tanh(),
        nn.ConvTranspose2d(6, 3, 2, groups=3),  # weight (6, 1, 2, 2): 3 groups of 2 rows
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 3),
        nn.Tanh(),
        nn.Linear(3, 1),
    )


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 2, 6, 6, generator=g)
    y = torch.randn(GLOBAL_BATCH, 1, generator=g)
    return x, y


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention``: owns in_proj_weight and has its out_proj Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class LayerScale(nn.Module):
    """A CaiT/ConvNeXt-style residual block: owns ``gamma`` and has layers of its own."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.fc2(torch.tanh(self.fc1(x)))


class SeqNet(nn.Module):
    """A body on (batch, length, 8) sequences, mean-pooled into one output."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(1))


LAYER_MODELS = ("mha", "encoder")
LAYER_OPTIMIZERS = ("sgd-all", "sgd-fused", "none")


def make_layer_model(kind: str) -> SeqNet:
    """Modules that own parameters and have children with parameters (FSDP2 units)."""
    torch.manual_seed(0)
    if kind == "mha":
        return SeqNet(SelfAttention(8))
    encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return SeqNet(nn.Sequential(encoder, LayerScale(8)))


def sequence_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(GLOBAL_BATCH, 4, 8, generator=g), torch.randn(GLOBAL_BATCH, 1, generator=g)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if name == "sgd-fused":  # the kernels on each local shard; ConvTranspose via all-reduce
        return gradcent.SGD(
            params, lr=0.1, momentum=0.9, weight_decay=1e-2, model=model, impl="fused"
        )
    if name == "adamw-fused":
        return gradcent.AdamW(params, lr=1e-2, weight_decay=1e-2, model=model, impl="fused")
    if name.startswith("sgd-"):
        mode = name.split("-", 1)[1]
        return gradcent.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, gc=mode, model=model)
    if name == "none":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)
    if name == "adam-attach":  # coupled decay folded into the gradient on DTensors
        opt = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2)
        gradcent.attach(opt, model, mode="all")
        return opt
    if name == "adamw-update":  # snapshots and projected updates are DTensors too
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
        gradcent.attach(opt, model, mode="all", where="update")
        return opt
    raise ValueError(name)


def train(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name.removeprefix("module.")] = t.detach().clone()
    return out


def unit_means(model: nn.Module, opt: torch.optim.Optimizer, mode: str) -> dict[str, float]:
    """Max |unit mean| of each planned momentum buffer, a sum of centred gradients
    P(g + λw): of this rank's shard when it holds whole units, of the gathered
    buffer when units span shards (p.grad itself holds P(g + λw) − λw)."""
    the_plan = gradcent.plan(model, mode)
    out = {}
    for name, p in model.named_parameters():
        spec = the_plan.spec(p)
        if spec is None:
            continue
        buf = opt.state[p]["momentum_buffer"]
        whole = not any(isinstance(pl, Shard) and pl.dim in spec.dims for pl in buf.placements)
        t = buf.to_local() if whole else buf.full_tensor()
        if t.numel() == 0:
            out[name] = 0.0
            continue
        t = t.unflatten(0, (spec.groups, -1)) if spec.groups > 1 else t
        dims = tuple(d + 1 for d in spec.dims) if spec.groups > 1 else spec.dims
        out[name] = t.mean(dim=dims).abs().max().item() / t.abs().max().item()
    return out


def local_rows(model: nn.Module) -> dict[str, int]:
    return {n: p.to_local().shape[0] for n, p in model.named_parameters() if p.dim() > 1}


def _even_dim1(p: torch.Tensor, world: int) -> bool:
    return p.dim() > 1 and p.shape[1] % world == 0


def shard_model(model: nn.Module, mesh, placement_fn=None) -> nn.Module:
    return fully_shard_model(model, mesh, shard_placement_fn=placement_fn)


def core_checks(mesh, rank: int) -> dict[str, float]:
    """centralize_ on DTensors of every placement vs. on the full tensor."""
    torch.manual_seed(2)
    cases = [
        ((3, 4), None, 1),
        ((1, 3), None, 1),
        ((6, 1, 2, 2), (0, 2, 3), 3),
        ((4, 3, 2, 2), (0, 2, 3), 2),
        ((5, 7, 2), (1, 2), 1),
    ]
    errs = {}
    for shape, dims, groups in cases:
        for pl in (Shard(0), Shard(1), Replicate()):
            for dtype in (torch.float32, torch.bfloat16):
                full = torch.randn(shape).to(dtype)
                ref = gradcent.centralize(full, dims, groups)
                d = distribute_tensor(full.clone(), mesh, [pl])
                gradcent.centralize_(d, dims, groups)
                err = (d.full_tensor().float() - ref.float()).abs().max().item()
                errs[f"{shape} dims={dims} g={groups} {pl} {dtype}"] = err
    # HSDP-style 2-D mesh (replicate x shard): the all-reduce goes over mesh dim 1 only.
    mesh2 = init_device_mesh("cpu", (1, mesh.size()), mesh_dim_names=("replicate", "shard"))
    for pl in (Shard(0), Shard(1)):
        full = torch.randn(6, 1, 2, 2)
        ref = gradcent.centralize(full, (0, 2, 3), 3)
        d = distribute_tensor(full.clone(), mesh2, [Replicate(), pl])
        gradcent.centralize_(d, (0, 2, 3), 3)
        errs[f"2d-mesh {pl}"] = (d.full_tensor() - ref).abs().max().item()
    # A pending sum (Partial) is centred summand by summand: P is linear.
    full = torch.randn(3, 4)
    d = DTensor.from_local(full * (rank + 1), mesh, [Partial()])
    gradcent.centralize_(d)
    errs["partial-sum"] = (d.full_tensor() - gradcent.centralize(full * 3)).abs().max().item()
    # centralize_many_ must not stack DTensors (torch.stack would gather them).
    fulls = [torch.randn(3, 4) for _ in range(3)]
    ds = [distribute_tensor(f.clone(), mesh, [Shard(0)]) for f in fulls]
    gradcent.centralize_many_(ds)
    errs["many"] = max(
        (d.full_tensor() - gradcent.centralize(f)).abs().max().item()
        for d, f in zip(ds, fulls, strict=True)
    )
    return errs


def main(out_file: str) -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    x, y = global_batch()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    results: dict = {"world": world, "core": core_checks(mesh, rank)}
    for opt_name in OPTIMIZERS:
        if rank == 0:
            ref = make_model()
            train(ref, make_optimizer(opt_name, ref), x, y)
            results[("ref", opt_name)] = full_params(ref)
        ddp = DDP(make_model())
        train(ddp, make_optimizer(opt_name, ddp), xs, ys)
        results[("ddp", opt_name)] = full_params(ddp)
        fsdp = shard_model(make_model(), mesh)
        opt = make_optimizer(opt_name, fsdp)
        train(fsdp, opt, xs, ys)
        results[("fsdp", opt_name)] = full_params(fsdp)
        if opt_name == "sgd-all":
            costs = [None] * world
            dist.all_gather_object(costs, gc_cost(fsdp, "all"))
            results["cost"] = costs
        if opt_name in MEANS_MODE:
            means = [None] * world
            dist.all_gather_object(means, unit_means(fsdp, opt, MEANS_MODE[opt_name]))
            results[("means", opt_name)] = means
    rows = [None] * world
    dist.all_gather_object(rows, local_rows(fsdp))
    results["rows"] = rows
    # FSDP2 with Shard(1) where FSDP allows it (it shards dims > 0 only evenly: the
    # conv weight here), so the conv units span both shards (cross-shard path).
    fsdp = shard_model(make_model(), mesh, lambda p: Shard(1) if _even_dim1(p, world) else Shard(0))
    opt = make_optimizer("sgd-all", fsdp)
    train(fsdp, opt, xs, ys)
    results[("fsdp-shard1", "sgd-all")] = full_params(fsdp)
    placements = [None] * world
    dist.all_gather_object(placements, {n: str(p.placements) for n, p in fsdp.named_parameters()})
    results["shard1-placements"] = placements
    means = [None] * world
    dist.all_gather_object(means, unit_means(fsdp, opt, "all"))
    results[("means-shard1", "sgd-all")] = means
    costs = [None] * world
    dist.all_gather_object(costs, gc_cost(fsdp, "all"))
    results["cost-shard1"] = costs
    # Modules that own parameters and have children with parameters.
    sx, sy = sequence_batch()
    sxs, sys_ = sx.chunk(world)[rank], sy.chunk(world)[rank]
    for kind in LAYER_MODELS:
        # No Adam here: the key bias of attention gets a zero gradient (softmax is
        # shift invariant), and Adam turns its float rounding noise into ±lr steps.
        for opt_name in LAYER_OPTIMIZERS:
            if rank == 0:
                ref = make_layer_model(kind)
                train(ref, make_optimizer(opt_name, ref), sx, sy)
                results[(f"{kind}-ref", opt_name)] = full_params(ref)
            fsdp = fully_shard_model(make_layer_model(kind), mesh)
            train(fsdp, make_optimizer(opt_name, fsdp), sxs, sys_)
            results[(f"{kind}-fsdp", opt_name)] = full_params(fsdp)
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


# The training harness runs (gradcent train under torchrun), one process group for
# all: DDP and FSDP2 with GroupNorm (every rank the same model), FSDP2 with
# BatchNorm uninterrupted and interrupted after one epoch, then resumed.
HARNESS_RUNS = (
    ("ddp-gn", "ddp", "gn", None),
    ("fsdp-gn", "fsdp", "gn", None),
    ("fsdp-bn", "fsdp", "bn", None),
    ("fsdp-bn-resumed", "fsdp", "bn", 1),
)


def harness_config(norm: str):
    """The digits run the harness tests train: small, 2 epochs, global batch 32."""
    from gradcent.experiments.config import RunConfig

    return RunConfig(
        dataset="digits", subset=200, epochs=2, batch_size=32, norm=norm, threads=1, quiet=True
    )


def bn_sync_check(run, world: int, rank: int) -> dict:
    """Running statistics of an FSDP2 BatchNorm net before and after ``sync_batchnorm``."""
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world,))
    net = fully_shard_model(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)), mesh)
    net(torch.randn(4, 2, 5, 5) + rank)  # each rank's own batch statistics
    bn = net[1]
    before = [None] * world
    dist.all_gather_object(before, (bn.running_mean.clone(), bn.running_var.clone()))
    run.sync_batchnorm(net)
    after = [None] * world
    dist.all_gather_object(after, (bn.running_mean.clone(), bn.running_var.clone()))
    return {"before": before, "after": after, "plain": type(bn.running_mean) is torch.Tensor}


def harness(out_dir: str) -> None:
    from pathlib import Path

    from gradcent.experiments import distributed_run
    from gradcent.experiments.datasets import build_dataset
    from gradcent.experiments.train import train_run

    warnings.filterwarnings("ignore")
    out = Path(out_dir)
    data = build_dataset("digits", None, 200)
    for name, kind, norm, stop_after in HARNESS_RUNS:
        distributed_run.setup(kind, "cpu")  # reuses the process group
        cfg = harness_config(norm)
        train_run(cfg, "gc", 0, out / name, data=data, stop_after=stop_after, log=None)
        if stop_after is not None:
            # Rank 0 writes the checkpoint: the others must not look for it earlier.
            dist.barrier()
            train_run(cfg, "gc", 0, out / name, data=data, resume=True, log=None)
    run = distributed_run.current()
    check = bn_sync_check(run, run.world, run.rank)
    if run.is_main:
        torch.save(check, out / "bn-sync.pt")
    distributed_run.teardown()
    # Everything is on disk. Skip the interpreter's teardown: there, rank 0 (the
    # TCPStore's host) aborted in C++ in 1 launch out of 5 ("terminate called
    # without an active exception") after several runs in one process group.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    # impl="fused" runs its kernels' Python eagerly here: what is under test is its
    # DTensor handling (local shards, the cross-shard ĝ); compiling them twice
    # on a shared CPU would take minutes, and tests/test_fused.py covers them.
    torch.compiler.set_stance("force_eager")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sys.argv[1] == "--harness":
        harness(sys.argv[2])
    else:
        main(sys.argv[1])
