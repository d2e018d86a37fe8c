"""The harness under ``torchrun``: DDP or FSDP2 on every rank, one set of files on rank 0.

``torchrun --nproc_per_node=N -m gradcent train ... --distributed ddp|fsdp`` starts
N copies of the command; :func:`setup` joins them into one process group and
makes a :class:`DistRun` the active run, which the training loop consults at
six points:

* the model is wrapped (DDP, or FSDP2 on every topmost module that owns
  parameters, see :func:`gradcent.distributed.shard_units`) before the
  optimizer is built, so GC plans the parameters the optimizer sees;
* each rank reads its part of every epoch through a :class:`RankSampler`
  seeded by ``(seed, epoch)``, and one process reads the whole epoch through
  the same sampler (rank 0 of 1): the global order of samples does not depend
  on the world size. ``--batch-size`` stays the *global* batch (each rank takes
  ``batch_size / N``), so a run means the same optimization at any world size
  and resumes under another one (docs/SCALING.md says how exactly);
* metrics are averaged over ranks with one all-reduce (every rank sees the
  same number of samples: the sampler pads with up to N − 1 repeats, which FSDP
  needs, since every rank must run the same number of forward passes);
* BatchNorm running statistics are averaged over the ranks at every epoch end,
  so every rank evaluates and checkpoints the same model;
* checkpoints hold full, unsharded state dicts in torch's own format, gathered
  with ``torch.distributed.checkpoint.state_dict`` and written by rank 0 only,
  so they resume under the same, another, or no world size;
* only rank 0 logs and writes files.

One process, ``--distributed none`` (the default), is a run of world size 1.

References:
    Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel
    Training", VLDB 2020 (DDP); Zhao et al., VLDB 2023 (FSDP).

"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

KINDS = ("none", "ddp", "fsdp")


@dataclass
class DistRun:
    """Where this process stands in the run.

    Attributes:
        kind: ``"none"``, ``"ddp"`` or ``"fsdp"``.
        rank: this process's rank (0 without torchrun).
        world: the number of processes.
        local_rank: the rank on this machine (picks the GPU).

    """

    kind: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """True when the model is wrapped and data is split across ranks."""
        return self.kind != "none"

    @property
    def is_main(self) -> bool:
        """True on the rank that logs and writes files."""
        return self.rank == 0

    def local_batch(self, batch_size: int) -> int:
        """Each rank's share of the global batch.

        Raises:
            ValueError: the global batch does not split evenly.

        """
        if batch_size % self.world:
            raise ValueError(
                f"Invalid --batch-size {batch_size}: not divisible by the "
                f"{self.world} ranks (it is the global batch)"
            )
        return batch_size // self.world

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP or FSDP2 around ``model``; build the optimizer after this."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = (
                [device.index if device.index is not None else self.local_rank]
                if device.type == "cuda"
                else None
            )
            return DistributedDataParallel(model, device_ids=ids)
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            from gradcent.distributed import fully_shard_model

            mesh = init_device_mesh(device.type, (self.world,))
            return fully_shard_model(model, mesh)
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model inside DDP (same parameters); FSDP2 and plain models as they are."""
        return model.module if self.kind == "ddp" and hasattr(model, "module") else model

    def sampler(self, dataset: Dataset, *, shuffle: bool, seed: int) -> RankSampler:
        """The share of the global order of ``dataset`` that this rank reads (:class:`RankSampler`).

        The same sampler serves one process (rank 0 of 1) and torchrun's ranks,
        so the global order is a function of ``seed`` alone; the training loop
        passes one seed per ``(seed, epoch)``.

        Args:
            dataset: the data.
            shuffle: permute (training) or keep the order (evaluation).
            seed: seeds the permutation.

        Returns:
            The sampler of this rank.

        """
        return RankSampler(
            len(dataset), shuffle=shuffle, seed=seed, rank=self.rank, world=self.world
        )

    def sync_batchnorm(self, model: nn.Module) -> None:
        """Average BatchNorm running statistics over the ranks (one all-reduce).

        Each rank updates its running mean and variance from its own local
        batches (no SyncBatchNorm), so without this the ranks evaluate and hold
        different models, and a checkpoint (rank 0's full state) could not
        resume the others exactly. The training loop calls this at the end of
        every epoch, before evaluating and checkpointing: every rank then
        holds the checkpointed statistics, so ``--resume`` at the same world
        size continues bit for bit, and at another one starts from what every
        rank held. Training itself is unchanged (in train mode BatchNorm
        normalises with batch statistics, not the running ones).

        Args:
            model: the (wrapped) model; its BatchNorm buffers are plain
                tensors under DDP and FSDP2 alike.

        References:
            Ioffe & Szegedy, ICML 2015 (BatchNorm running statistics); timm's
            ``distribute_bn`` (the same average at every epoch end).

        """
        if not self.active:
            return
        import torch.distributed as dist

        stats = [
            t
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
            for t in (m.running_mean, m.running_var)
        ]
        if not stats:
            return
        flat = torch.cat([t.detach().reshape(-1).to(_comm_device(), torch.float64) for t in stats])
        dist.all_reduce(flat)
        flat /= self.world
        for t, mean in zip(stats, flat.split([t.numel() for t in stats]), strict=True):
            t.copy_(mean.view_as(t))

    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean of each value over the ranks (one all-reduce)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """The full model state dict (torch's keys), on rank 0; {} elsewhere."""
        if not self.active:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The full optimizer state dict in torch's index-keyed format, on rank 0."""
        if not self.active:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=_full_options())
        return by_index(state, param_names(model, optimizer)) if self.is_main else {}

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict) -> None:
        """Load a checkpoint of any world size (every rank reads the full state)."""
        if not self.active:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        # Both setters replace the tensors of the dicts they are given by shards:
        # hand them copies, so the caller's checkpoint stays whole.
        set_model_state_dict(model, dict(ckpt["model"]), options=options)
        state = by_name(ckpt["optimizer"], param_names(model, optimizer))
        set_optimizer_state_dict(model, optimizer, state, options=options)

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a default output folder's timestamp)."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def global_order(n: int, *, shuffle: bool, seed: int) -> list[int]:
    """The order in which a run visits ``n`` samples in one epoch, at any world size.

    Args:
        n: the number of samples.
        shuffle: a permutation seeded by ``seed`` (training), else ``0 .. n-1``.
        seed: the epoch's seed.

    Returns:
        The sample indices, in order.

    """
    if not shuffle:
        return list(range(n))
    g = torch.Generator()
    g.manual_seed(seed)
    # The order one process has always used: DataLoader(shuffle=True, generator=g)
    # first takes its workers' base seed from g, then RandomSampler permutes with
    # g. Taking the same draw first keeps every recorded one-process run as it was.
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return torch.randperm(n, generator=g).tolist()


class RankSampler(Sampler[int]):
    """Rank ``r``'s share of an epoch's global order: every ``world``-th sample from ``r``.

    The order (:func:`global_order`) is padded with its first samples to a
    multiple of ``world``, so that every rank runs the same number of steps
    (each FSDP forward is a collective). With a local batch of ``b`` on each
    rank, global step ``k`` reads samples ``k·b·world`` to ``(k+1)·b·world − 1``
    of the order on the ranks together: the batch one process of batch
    ``b·world`` reads at step ``k``. The same split as ``DistributedSampler``,
    whose own permutation differs from one process's ``RandomSampler``.

    Args:
        n: the number of samples.
        shuffle: permute (training) or keep the order (evaluation).
        seed: the epoch's seed.
        rank: this process's rank.
        world: the number of ranks.

    References:
        torch.utils.data.distributed.DistributedSampler (the same split).

    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def __iter__(self) -> Iterator[int]:
        order = global_order(self.n, shuffle=self.shuffle, seed=self.seed)
        total = len(self) * self.world
        while len(order) < total:  # a few repeats (more than n only for tiny data)
            order += order[: total - len(order)]
        return iter(order[self.rank : total : self.world])


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Unsharded tensors on the CPU of rank 0 only: the file does not depend on
    # the world size, and no rank holds more than one full copy in memory.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _comm_device() -> torch.device:
    import torch.distributed as dist

    backend = dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every optimizer parameter, in the optimizer's order.

    Names are the unwrapped model's (DDP's ``module.`` prefix removed; FSDP2
    keeps the names), the keys ``get_optimizer_state_dict`` uses.
    """
    names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def by_index(state: dict, names: list[str]) -> dict:
    """A name-keyed optimizer state dict in torch's index-keyed format."""
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def by_name(state: dict, names: list[str]) -> dict:
    """Torch's index-keyed optimizer state dict, keyed by parameter name."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: dict(s) for i, s in state["state"].items()}, "param_groups": groups}


_CURRENT = DistRun()


def current() -> DistRun:
    """The active run (a one-process run unless :func:`setup` made another)."""
    # Process-wide like torch's default process group, which it describes.
    return _CURRENT


def setup(kind: str, device: str = "auto") -> DistRun:
    """Join the torchrun process group and make the run active.

    Args:
        kind: ``"none"``, ``"ddp"`` or ``"fsdp"``.
        device: the run's device option; CUDA uses NCCL on ``LOCAL_RANK``'s
            GPU, the CPU uses gloo.

    Returns:
        The active :class:`DistRun`.

    Raises:
        ValueError: an unknown kind, or ddp/fsdp without torchrun's environment.

    References:
        torch.distributed.run (torchrun) environment variables.

    """
    global _CURRENT
    if kind not in KINDS:
        raise ValueError(f"Invalid --distributed {kind!r} (expected one of {', '.join(KINDS)})")
    if kind == "none":
        _CURRENT = DistRun()
        return _CURRENT
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"--distributed {kind} needs torchrun: torchrun --nproc_per_node=N -m gradcent ..."
        )
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device in ("cuda", "auto") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    _CURRENT = DistRun(kind, dist.get_rank(), dist.get_world_size(), local_rank)
    if not _CURRENT.is_main:
        # Rank 0 alone logs (as torchvision's reference scripts do); errors and
        # warnings still reach every rank's stderr.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return _CURRENT


def teardown(wait: bool = True) -> None:
    """Leave the process group and go back to a one-process run.

    Args:
        wait: first wait for every rank (a clean finish); False after an error,
            when the other ranks may never arrive.

    """
    global _CURRENT
    if _CURRENT.active:
        import torch.distributed as dist

        if wait:
            dist.barrier()
        # A DDP model caught in a reference cycle still holds the group; collect it
        # now so that the group is destroyed here, not at interpreter exit, where
        # gloo can abort ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()
        if not _CURRENT.is_main:
            sys.stdout = sys.__stdout__
    _CURRENT = DistRun()


@contextlib.contextmanager
def launched(kind: str, device: str = "auto") -> Iterator[DistRun]:
    """:func:`setup` on entry, :func:`teardown` on exit (no waiting after an error).

    Args:
        kind: ``"none"``, ``"ddp"`` or ``"fsdp"``.
        device: the run's device option.

    Yields:
        The active :class:`DistRun`.

    References:
        torch.distributed.run (torchrun).

    """
    run = setup(kind, device)
    try:
        yield run
    except BaseException:
        teardown(wait=False)
        raise
    teardown()
