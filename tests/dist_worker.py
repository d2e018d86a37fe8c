"""One rank of the distributed GC checks, launched twice by tests/test_distributed.py.

Run as ``python tests/dist_worker.py OUT_FILE`` with RANK, WORLD_SIZE, MASTER_ADDR
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
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    # impl="fused" runs its kernels' Python eagerly here: what is under test is its
    # DTensor handling (local shards, the cross-shard ĝ); compiling them twice
    # on a shared CPU would take minutes, and tests/test_fused.py covers them.
    torch.compiler.set_stance("force_eager")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
