"""GC beyond one machine: DDP, FSDP2 (DTensor shards), and what GC costs there.

* **DDP** needs nothing: DistributedDataParallel all-reduces the gradients during
  ``backward``, so when ``optimizer.step()`` runs every rank holds the same full
  gradient, applies the same GC and takes the same step. ``attach`` and the named
  optimizers work unchanged (and so does ``where="update"``).
* **FSDP2** (``torch.distributed.fsdp.fully_shard``) hands the optimizer DTensor
  parameters and gradients, sharded ``Shard(0)`` by default. GC runs on each
  rank's local shard; :func:`gradcent.core.centralize_` does it (it lives there,
  not here, because the optimizer layer calls it and must not import this
  layer). Two paths:

  - *local*: no mesh dim shards a reduction dim, so each shard holds whole
    output units (``Shard(0)`` of a Linear or Conv weight, whose output axis is
    dim 0; uneven and empty shards included). No communication.
  - *all-reduce*: a shard holds part of some units (a ConvTranspose weight,
    ``(in, out/g, k…)``, whose units span dim 0; any ``Shard(d)`` with ``d`` a
    reduction dim). Each rank sums its part of every unit in float32 and one
    all-reduce per such mesh dim, of one float per unit of the local shard,
    completes the means. Plain DTensor ops (``g.mean(dims, keepdim=True)`` then
    ``g.sub_``) were tried first: they fail with an in-place placement error
    when a weight has a single row (an empty shard), hence the explicit path.

:func:`gc_cost` lists, for a sharded model, which path every planned parameter
takes and how many floats GC all-reduces per step.

References:
    Yong et al., ECCV 2020, Eq. 1 (the per-unit mean) and §3.3 (GC's cost).
    Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data
    Parallel", VLDB 2023 (FSDP's sharding of parameters and gradients).

"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradcent.core import is_dtensor, mesh_dims_splitting_units
from gradcent.rules import Plan, Spec, plan


@dataclass(frozen=True)
class GCCost:
    """How GC runs for one planned parameter, and what it communicates.

    Attributes:
        name: the parameter's qualified name.
        placements: its DTensor placements, ``"dense"`` for a plain tensor.
        path: ``"dense"`` (a plain tensor: DDP or one process), ``"local"``
            (every shard holds whole units: no communication) or
            ``"all-reduce"`` (units span shards).
        collectives: all-reduces GC issues per step for it (one per mesh dim
            that splits its units).
        floats: elements each of those all-reduces carries on this rank (one
            per output unit of the local shard; 0 on the other paths).
        bytes: ``collectives * floats`` times the accumulation dtype's size.

    """

    name: str
    placements: str
    path: str
    collectives: int
    floats: int
    bytes: int


def unit_spans_shards(p: Tensor, spec: Spec) -> list[int]:
    """The mesh dims across which the output units of ``p`` are split.

    Args:
        p: a parameter or gradient (a DTensor, or a plain tensor).
        spec: its GC spec (the reduction dims one unit spans).

    Returns:
        Mesh dim indices whose ``Shard(d)`` has ``d`` among ``spec.dims``; empty
        for plain tensors and for layouts where GC is local.

    References:
        Yong et al., ECCV 2020, Eq. 1.

    """
    return mesh_dims_splitting_units(p, spec.dims) if is_dtensor(p) else []


def _cost(name: str, p: Tensor, spec: Spec) -> GCCost:
    if not is_dtensor(p):
        return GCCost(name, "dense", "dense", 0, 0, 0)
    placements = ", ".join(str(pl) for pl in p.placements)
    split = unit_spans_shards(p, spec)
    if not split:
        return GCCost(name, placements, "local", 0, 0, 0)
    local_shape = p.to_local().shape
    # The all-reduced buffer: one sum per unit of the local shard; dim 0 folds
    # into one row per group when it is a reduction dim (ConvTranspose).
    floats = spec.groups if 0 in spec.dims else 1
    for d, size in enumerate(local_shape):
        if d not in spec.dims:
            floats *= size
    itemsize = torch.promote_types(p.dtype, torch.float32).itemsize
    return GCCost(
        name, placements, "all-reduce", len(split), floats, len(split) * floats * itemsize
    )


def gc_cost(
    model: nn.Module,
    mode: str | None = "all",
    *,
    gc_plan: Plan | None = None,
    params: Iterable[tuple[str, Tensor]] | None = None,
) -> list[GCCost]:
    """Which GC path each planned parameter takes on this rank, and its traffic.

    Call it after ``fully_shard`` (the parameters must be the DTensors the
    optimizer sees). Parameters that GC leaves alone are not listed.

    Args:
        model: the (sharded) model.
        mode: the GC mode, as in :func:`gradcent.plan` (ignored with ``gc_plan``).
        gc_plan: a plan already built for this model (e.g. ``handle.plan``).
        params: ``(name, parameter)`` pairs to report instead of all of the
            model's.

    Returns:
        One :class:`GCCost` per planned parameter, in the model's order.

    Example:
        >>> fully_shard(model)
        >>> sum(c.bytes for c in gradcent.distributed.gc_cost(model))  # per step
        0

    References:
        Yong et al., ECCV 2020, §3.3 (GC's computational cost).

    """
    the_plan = gc_plan if gc_plan is not None else plan(model, mode)
    rows = []
    for name, p in params if params is not None else model.named_parameters():
        spec = the_plan.spec(p)
        if spec is not None:
            rows.append(_cost(name, p, spec))
    return rows


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`fully_shard_model` shards one by one, before the root.

    Each is a topmost module below the root that owns parameters directly; it
    becomes one FSDP unit together with everything under it. A module that owns
    parameters may read its children's parameters without calling their
    ``forward`` (``nn.MultiheadAttention`` passes ``out_proj.weight`` to
    ``F.multi_head_attention_forward``), so a child sharded on its own would
    still be a shard when its parent computes; one unit per such subtree avoids
    it. Modules without parameters of their own (``TransformerEncoderLayer``,
    ``Sequential``) are looked through.

    Args:
        model: the model.

    Returns:
        The units, in the model's order, each module once.

    References:
        Zhao et al., VLDB 2023 (FSDP units).

    """
    units: list[nn.Module] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if id(child) in seen:  # a module shared by two parents
                continue
            seen.add(id(child))
            if any(True for _ in child.parameters(recurse=False)):
                units.append(child)
            else:
                visit(child)

    visit(model)
    return units


def _bottom_up(model: nn.Module, leaves: Iterable[nn.Module]) -> list[nn.Module]:
    """``leaves`` with every module after the ones nested in it (deepest first)."""
    depth = {id(m): name.count(".") + 1 for name, m in model.named_modules() if name}
    leaves = list(leaves)
    for m in leaves:
        if id(m) not in depth:
            raise ValueError(
                f"Invalid leaves: {type(m).__name__} is not a submodule of the model "
                "(expected modules of the model, not the model itself)"
            )
    # fully_shard manages every parameter under a module that no inner unit
    # claimed, so inner units must be sharded first. sorted() is stable: equal
    # depths keep the caller's order.
    return sorted(leaves, key=lambda m: -depth[id(m)])


def fully_shard_model(
    model: nn.Module,
    mesh: object | None = None,
    *,
    leaves: Iterable[nn.Module] | None = None,
    **fsdp_kwargs: object,
) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to each unit of the model, then the root.

    The default units are :func:`shard_units`: every topmost module that owns
    parameters, with its children in the same unit (``nn.MultiheadAttention``
    with its ``out_proj``, a LayerScale block with its layers); plain
    containers such as ``TransformerEncoderLayer`` are looked through. Build the
    optimizer (or call :func:`gradcent.attach`) after this: FSDP2 replaces the
    parameters by DTensors, and GC's plan is keyed by parameter.

    Args:
        model: the model (modified in place).
        mesh: a 1-D ``DeviceMesh`` (default: FSDP2's, all ranks on the
            current device type).
        leaves: the modules to shard one by one (default: :func:`shard_units`);
            for large models pass the blocks. Nested ones are sharded inner
            first, as ``fully_shard`` requires.
        **fsdp_kwargs: passed to ``fully_shard`` (``reshard_after_forward``,
            ``shard_placement_fn``, ``mp_policy``, ...).

    Returns:
        ``model``, now an FSDP2 module.

    Raises:
        ValueError: a module of ``leaves`` is not inside ``model``.

    References:
        Zhao et al., VLDB 2023 (FSDP); torch.distributed.fsdp.fully_shard.

    """
    from torch.distributed.fsdp import fully_shard

    units = shard_units(model) if leaves is None else _bottom_up(model, leaves)
    for m in units:
        fully_shard(m, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model
