"""The Gradient Centralization operator on tensors.

Φ_GC(∇w_i) = ∇w_i − mean(∇w_i) for every output unit w_i (Eq. 1), i.e. P∇W with
P = I − eeᵀ, e = 1/√M (Eq. 2). This module knows nothing about modules or
optimizers: it receives a tensor and the dims that span one output unit.

References:
    Yong, Huang, Hua, Zhang. "Gradient Centralization: A New Optimization Technique
    for Deep Neural Networks". ECCV 2020, arXiv:2004.01461, Eq. 1-2.

"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor

Dims = Sequence[int] | None

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Same-shaped tensors below this size are centred together in one stacked call:
# for small tensors the kernel-launch cost dominates the memory traffic.
_STACK_MAX_NUMEL = 1 << 16
# torch's CPU reduction grain (32768 elements): a unit up to this size is summed by
# one thread in one order, alone or stacked with others; a longer one may be split
# between threads differently in a stack, so it is not stacked (bit-identical results).
_REDUCE_GRAIN = 1 << 15


def _resolve_dims(t: Tensor, dims: Dims) -> tuple[int, ...]:
    """Reduction dims as non-negative ints; default is every dim but 0."""
    if dims is None:
        return tuple(range(1, t.dim()))
    if isinstance(dims, int):
        dims = (dims,)
    for d in dims:
        # Check before wrapping: d % ndim would silently turn dim 5 of a 2-D tensor into 1.
        if isinstance(d, bool) or not isinstance(d, int) or not -t.dim() <= d < t.dim():
            raise ValueError(f"Invalid dim {d!r} for a tensor of shape {tuple(t.shape)}")
    return tuple(sorted({d % t.dim() for d in dims}))


def _check_groups(shape: Sequence[int], dims: tuple[int, ...], groups: int) -> None:
    """Raise unless dim 0 can be split into ``groups`` and is among the reduced dims."""
    if groups == 1:
        return
    if 0 not in dims:
        raise ValueError(f"groups={groups} needs dim 0 among the reduction dims, got {dims}")
    if shape[0] % groups:
        raise ValueError(f"dim 0 of shape {tuple(shape)} is not divisible by groups={groups}")


def _unit_view(t: Tensor, dims: tuple[int, ...], groups: int) -> tuple[Tensor, tuple[int, ...]]:
    """View ``t`` so that each output unit spans ``dims`` of the view.

    With ``groups > 1`` dim 0 is split into ``(groups, dim0 // groups)``; only the
    inner part is reduced (ConvTranspose: each output channel sees the inputs of
    its own group only). Splitting one dim is always a view, so in-place work on
    the result writes through to ``t`` for any strides.
    """
    if groups == 1:
        return t, dims
    _check_groups(t.shape, dims, groups)
    view = t.unflatten(0, (groups, t.shape[0] // groups))
    return view, tuple(d + 1 for d in dims)


def unit_size(shape: Sequence[int], dims: Dims = None, groups: int = 1) -> int:
    """M, the number of inputs of one output unit (C_in·k1·k2 for a conv).

    Args:
        shape: shape of the weight.
        dims: reduction dims (default: all but 0).
        groups: how many groups dim 0 is split into (ConvTranspose).

    Returns:
        The number of elements each unit's mean is taken over.

    """
    dims = tuple(range(1, len(shape))) if dims is None else dims
    m = 1
    for d in dims:
        m *= shape[d]
    return m // groups if groups > 1 else m


def _subtract_mean_(view: Tensor, dims: tuple[int, ...]) -> None:
    """In place: view -= mean over dims, accumulated in float32 for fp16/bf16."""
    if view.dtype in _LOW_PRECISION:
        wide = view.float()
        view.copy_(wide.sub_(wide.mean(dim=dims, keepdim=True)))
    else:
        view.sub_(view.mean(dim=dims, keepdim=True))


# DTensor (FSDP2, tensor parallel) support lives here, not in gradcent.distributed:
# the optimizer layer calls centralize_ and must not import layer 4. Nothing here
# imports torch.distributed unless a DTensor is actually passed in.
def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor, without importing torch.distributed for plain tensors.

    Args:
        t: any tensor.

    Returns:
        True for a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded
        parameters and gradients), False otherwise.

    References:
        PyTorch, ``torch.distributed.tensor`` (DTensor).

    """
    # A DTensor can only exist once torch.distributed.tensor is imported.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def mesh_dims_splitting_units(t: Tensor, rdims: Sequence[int]) -> list[int]:
    """The mesh dims of a DTensor whose ``Shard(d)`` cuts GC units apart.

    Args:
        t: a DTensor.
        rdims: the dims GC reduces over (Eq. 1's average runs along them).

    Returns:
        Indices of ``t.placements`` that are ``Shard(d)`` with ``d`` in
        ``rdims``: along those, a unit's mean needs its other shards.

    References:
        Yong et al., ECCV 2020, Eq. 1 (the reduction axes).

    """
    from torch.distributed.tensor import Shard

    return [i for i, pl in enumerate(t.placements) if isinstance(pl, Shard) and pl.dim in rdims]


def _centralize_dtensor_(t: Tensor, rdims: tuple[int, ...], groups: int) -> None:
    """Centralize a DTensor in place, shard by shard.

    When no mesh dim shards a reduction dim (FSDP2's Shard(0) of a weight whose
    output axis is dim 0, Replicate), every unit lies whole on one shard: the
    local shard is centred with no communication, uneven and empty shards
    included. Otherwise (ConvTranspose under Shard(0), Shard(1)) each rank sums
    its part of every unit in float32 and one all-reduce per splitting mesh dim,
    of one float per unit, completes the means. Only global metadata decides
    the path, so every rank joins the same collectives, even with an empty shard.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for pl in t.placements:
        # P is linear: each pending summand of a sum/avg Partial is centred alone.
        if isinstance(pl, Partial) and pl.reduce_op not in ("sum", "avg"):
            raise ValueError(f"Cannot centralize a DTensor with placement {pl}: not linear")
    if groups > 1 and t.shape[0] % groups:
        raise ValueError(f"dim 0 of shape {tuple(t.shape)} is not divisible by groups={groups}")
    local = t.to_local()
    split = mesh_dims_splitting_units(t, rdims)
    if not split:
        if local.numel():
            _subtract_mean_(*_unit_view(local, rdims, groups))
        return
    acc = torch.promote_types(local.dtype, torch.float32)
    inner = tuple(d for d in rdims if d != 0)
    sums = local.sum(dim=inner, keepdim=True, dtype=acc) if inner else local.to(acc)
    rows = None
    if 0 in rdims:
        # One row of sums per group; a shard of dim 0 may straddle groups.
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        rows = torch.arange(local.shape[0], device=local.device).add_(offset[0])
        rows = rows.div_(t.shape[0] // groups, rounding_mode="floor")
        sums = sums.new_zeros((groups, *sums.shape[1:])).index_add_(0, rows, sums)
    for i in split:
        dist.all_reduce(sums, group=t.device_mesh.get_group(i))
    mean = sums.div_(unit_size(t.shape, rdims, groups))
    if rows is not None:
        mean = mean.index_select(0, rows)
    if local.dtype == acc:
        local.sub_(mean)
    elif local.numel():
        local.copy_(local.to(acc).sub_(mean))


def centralize_(t: Tensor, dims: Dims = None, groups: int = 1) -> Tensor:
    """Centralize ``t`` in place: subtract each output unit's mean (Eq. 1).

    Args:
        t: a gradient (or any tensor), any strides, channels_last included.
        dims: the dims one output unit spans (default: all but 0, i.e. the
            PyTorch layout where dim 0 is the output axis).
        groups: split dim 0 into this many groups, each unit being centred within
            its group (ConvTranspose with ``groups > 1``).

    Returns:
        ``t`` itself. Tensors with no reduction dims, no elements, or units of a
        single input (M = 1, whose centred gradient would be identically zero) are
        returned untouched: GC never freezes a unit.

    References:
        Yong et al., ECCV 2020, Eq. 1.

    """
    if not isinstance(t, Tensor):
        raise TypeError(f"centralize_ expects a torch.Tensor, got {type(t).__name__}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"Invalid groups: {groups!r} (expected an int >= 1)")
    rdims = _resolve_dims(t, dims)
    _check_groups(t.shape, rdims, groups)  # before any early return
    if not rdims or t.numel() == 0 or unit_size(t.shape, rdims, groups) <= 1:
        return t
    if is_dtensor(t):
        _centralize_dtensor_(t, rdims, groups)
        return t
    _subtract_mean_(*_unit_view(t, rdims, groups))
    return t


def centralize(t: Tensor, dims: Dims = None, groups: int = 1) -> Tensor:
    """Return Φ_GC(t) = P t, leaving ``t`` unchanged.

    Args:
        t: the tensor to centralize.
        dims: the dims one output unit spans (default: all but 0).
        groups: see :func:`centralize_`.

    Returns:
        A new tensor with every output unit's mean removed.

    Example:
        >>> centralize(torch.tensor([[1., 2.], [3., 4.]]))
        tensor([[-0.5000,  0.5000],
                [-0.5000,  0.5000]])

    References:
        Yong et al., ECCV 2020, Eq. 1-2.

    """
    return centralize_(t.clone() if isinstance(t, Tensor) else t, dims, groups)


def centralize_many_(
    tensors: Sequence[Tensor],
    dims: Sequence[Dims] | Dims = None,
    groups: Sequence[int] | int = 1,
) -> None:
    """Centralize a list of tensors in place.

    Many small tensors of the same shape, dtype and device are stacked and
    centred in one call (one kernel launch instead of one per tensor); every
    other tensor is centred on its own. The result is identical to calling
    :func:`centralize_` on each tensor.

    Args:
        tensors: tensors to centralize in place.
        dims: one reduction-dims entry per tensor, or one for all of them.
        groups: one groups entry per tensor, or one for all of them.

    References:
        Yong et al., ECCV 2020, Eq. 1.

    """
    n = len(tensors)
    per_dims = list(dims) if _is_per_tensor(dims) else [dims] * n
    per_groups = list(groups) if isinstance(groups, Sequence) else [groups] * n
    if len(per_dims) != n or len(per_groups) != n:
        raise ValueError(
            f"got {n} tensors but {len(per_dims)} dims and {len(per_groups)} groups entries"
        )
    buckets: dict[tuple, list[Tensor]] = {}
    for t, d, g in zip(tensors, per_dims, per_groups, strict=False):
        rdims = _resolve_dims(t, d)
        if not rdims or t.numel() == 0:
            continue  # nothing to centre: skip the stack-and-copy round trip
        # Only contiguous tensors are stacked: a reduction over another memory
        # layout sums in another order, and the result must match centralize_ bit for bit.
        # So are units of more than torch's reduction grain (32768 elements): alone,
        # such a unit may be summed by several threads, in the stack by one.
        stackable = (
            t.numel() <= _STACK_MAX_NUMEL
            and g == 1
            and t.is_contiguous()
            and unit_size(t.shape, rdims) <= _REDUCE_GRAIN
        )
        if stackable and not is_dtensor(t):
            key = (tuple(t.shape), t.dtype, t.device, rdims)
            buckets.setdefault(key, []).append(t)
        else:
            centralize_(t, rdims, g)
    for (_, _, _, rdims), group in buckets.items():
        if len(group) == 1:
            centralize_(group[0], rdims)
            continue
        stacked = torch.stack(group)
        centralize_(stacked, tuple(d + 1 for d in rdims))
        torch._foreach_copy_(group, list(stacked.unbind(0)))


def _is_per_tensor(dims: object) -> bool:
    """True when ``dims`` is a list of entries (None or a sequence), one per tensor.

    A flat sequence of ints is one ``dims`` for all tensors; a list whose
    length does not match the tensors is reported by the caller.
    """
    if dims is None or not isinstance(dims, Sequence) or len(dims) == 0:
        return False
    return all(d is None or isinstance(d, Sequence) for d in dims)
