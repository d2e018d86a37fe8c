"""The fused step: GC and the optimizer update computed together, compiled.

``impl="default"`` centralizes every gradient in a separate pass, then runs
torch's own step: one more read and write of every gradient. ``impl="fused"``
computes, per parameter, the per-unit mean of ĝ = g + λw and the whole update
in one compiled kernel (``torch.compile``: Inductor emits C++ on CPU and Triton
on GPU). Inductor's outer-loop fusion computes each unit's mean and then updates
that unit while its row is still in cache, so GC adds no pass over memory.
(Memory traffic is not the whole cost: on the 2-core CPU measured in
docs/BENCHMARKS.md this kernel is still slower than torch's hand-written fused
Adam, and each compiled call pays Dynamo's per-call overhead; on CPU,
``impl="native"`` (:mod:`._native`) is the fast path.) Which impl runs is
decided in :mod:`._impl`.

Each GC'd parameter is viewed as a 2-D ``(units, M)`` tensor (a conv weight
``(out, in, k, k)`` as ``(out, in·k·k)``; channels_last too, since the mean is
taken over a whole unit whatever its inner order) and every other parameter as
1-D, with dynamic shapes, so every parameter set compiles to the same few small
graphs and later steps reuse them.

What the default path does and this one does not: it leaves ``p.grad``
untouched (torch's optimizers never write ``p.grad`` either), which is exactly
the pass over memory it saves.

References:
    Yong et al., ECCV 2020, Algorithm 1 (SGDM + GC), Algorithm 2 (Adam + GC),
    §3.4 (ĝ = P(g + λw)).

"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradcent.core import centralize, is_dtensor
from gradcent.optim._impl import decay_terms, kernel_kind, loop_state, register
from gradcent.rules import Spec

# Scalar slots passed to the kernels as one small tensor, so that a learning-rate
# schedule or the step count changes a value, never a guard (no recompilation).
_SGD_SLOTS = ("lr", "momentum", "damp", "l2", "decay_mul", "g_coef", "buf_coef")
_ADAM_SLOTS = ("step_size", "1-beta1", "beta2", "1-beta2", "eps", "l2", "bc2_sqrt", "decay_mul")


# ---------------------------------------------------------------- the math
# Pure functions of one parameter: they return the new tensors, and the callers
# write them back with one _foreach_copy_ (in-place writes inside the graph hit an
# Inductor CPU outer-loop-fusion bug, pytorch/pytorch#196570).


def _centred(g: Tensor, p: Tensor, l2: Tensor, centre: bool) -> Tensor:
    """ĝ = P(g + λw) on a (units, M) view, or g + λw when not centring (§3.4)."""
    g = g + l2 * p
    if centre:
        g = g - g.mean(dim=-1, keepdim=True)
    return g


def _sgd_math(
    p: Tensor, g: Tensor, buf: Tensor | None, s: Tensor, centre: bool
) -> tuple[Tensor, ...]:
    """One SGD(M) step of torch's for-loop, on ĝ (Algorithm 1)."""
    lr, momentum, damp, l2, decay_mul, g_coef, buf_coef = s.unbind(0)
    g = _centred(g, p, l2, centre)
    if buf is None:
        return (p * decay_mul - lr * g,)
    # damp is 1 on the first step and buf is zero then, so buf2 = ĝ exactly as
    # torch's clone of the first gradient.
    buf2 = buf * momentum + damp * g
    # Nesterov is (g_coef, buf_coef) = (1, momentum), plain momentum (0, 1): exact
    # either way, and one graph serves both.
    upd = g_coef * g + buf_coef * buf2
    return p * decay_mul - lr * upd, buf2


def _adam_math(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    vmax: Tensor | None,
    s: Tensor,
    centre: bool,
) -> tuple[Tensor, ...]:
    """One Adam/AdamW step of torch's for-loop, on ĝ (Algorithm 2)."""
    step_size, w1, beta2, w2, eps, l2, bc2_sqrt, decay_mul = s.unbind(0)
    g = _centred(g, p, l2, centre)
    # torch's lerp_ for a weight below 0.5, without lerp's second branch and select.
    m2 = m + w1 * (g - m)
    v2 = v * beta2 + w2 * g * g
    out_v = v2 if vmax is None else torch.maximum(vmax, v2)
    p2 = p * decay_mul - step_size * m2 / (out_v.sqrt() / bc2_sqrt + eps)
    return (p2, m2, v2) if vmax is None else (p2, m2, v2, out_v)


def _sgd_one(p, g, buf, s, centre: bool) -> None:
    new = _sgd_math(p, g, buf, s, centre)
    torch._foreach_copy_([p] if buf is None else [p, buf], list(new))


def _adam_one(p, g, m, v, vmax, s, centre: bool) -> None:
    new = _adam_math(p, g, m, v, vmax, s, centre)
    torch._foreach_copy_([p, m, v] if vmax is None else [p, m, v, vmax], list(new))


_EAGER: dict[str, Callable[..., None]] = {"sgd": _sgd_one, "adam": _adam_one}
_COMPILED: dict[str, Callable[..., None]] = {}


def compiled_kernel(name: str) -> Callable[..., None]:
    """The compiled kernel ``name`` (``"sgd_one"`` or ``"adam_one"``), built once.

    Args:
        name: which kernel.

    Returns:
        ``torch.compile(fn, dynamic=True)`` of it; Dynamo caches
        its graphs per function, so every optimizer shares them.

    """
    if name not in _COMPILED:
        fn = {"sgd_one": _sgd_one, "adam_one": _adam_one}[name]
        # No fullgraph=True: it adds a config patch to every call (tens of µs per
        # parameter on CPU); the kernels have no graph break (tests count graphs).
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


# ---------------------------------------------------------------- the views


def _alias(t: Tensor, shape: tuple[int, ...], stride: tuple[int, ...]) -> Tensor:
    """A new tensor on ``t``'s storage that is not a view (``_base`` is None).

    Dynamo guards on the base of a view; a fresh alias keeps the guards to the
    shape and strides that matter, so later steps do not recompile.
    """
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), shape, stride)


def _dense(t: Tensor) -> bool:
    """True when ``t`` fills its memory exactly: some permutation of it is contiguous."""
    expected = 1
    for stride, size in sorted(
        (st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _rows(t: Tensor, centre: bool) -> Tensor:
    """``t`` as (units, M) when centring (units contiguous blocks), else flat 1-D.

    Both are element-for-element aliases of the same memory, so tensors with
    identical strides line up element by element whatever their inner order.
    """
    if centre:
        m = t.numel() // t.shape[0]
        return _alias(t, (t.shape[0], m), (m, 1))
    return _alias(t, (t.numel(),), (1,))


def _cached_rows(cache: dict[int, tuple], owner: Tensor, t: Tensor, centre: bool) -> Tensor:
    """:func:`_rows` of ``t`` (a parameter's data or a state tensor), kept between steps.

    Making an alias costs more than the kernel for a small parameter, and these
    tensors keep their storage across steps. The entry goes when ``owner`` dies,
    so a replaced state never stays alive through its alias. Gradients are never
    cached: the alias would keep a freed gradient's memory alive.
    """
    key = (t.data_ptr(), tuple(t.shape), t.stride(), centre)
    hit = cache.get(id(owner))
    if hit is not None and hit[0]() is owner and hit[1] == key:
        return hit[2]
    rows = _rows(t, centre)
    oid = id(owner)
    ref = weakref.ref(owner, lambda _: cache.pop(oid, None))
    cache[oid] = (ref, key, rows)
    return rows


def _fast(p: Tensor, tensors: list[Tensor], spec: Spec | None) -> bool:
    """True when ``p`` and its grad/state can go through the kernel as rows."""
    if p.numel() == 0 or not _dense(p):
        return False
    if any(t.stride() != p.stride() or not _dense(t) for t in tensors):
        return False
    if spec is None:
        return True
    standard = spec.groups == 1 and tuple(spec.dims) == tuple(range(1, p.dim()))
    # Units are rows only when each unit is one contiguous block of M elements.
    return standard and p.stride(0) == p.numel() // p.shape[0]


# ---------------------------------------------------------------- the step


def _scalars(values: list[list[float]], device: torch.device) -> list[Tensor]:
    """One float32 row per parameter, moved to the device in one copy."""
    table = torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)
    # Rows as fresh aliases, not views: a view would make Dynamo guard on the
    # table's size (the number of parameters) and recompile for every new set.
    return [_alias(row, tuple(row.shape), row.stride()) for row in table.unbind(0)]


class _Batch:
    """The kernel arguments of one group, split by device and dtype."""

    def __init__(self) -> None:
        self.cols: list[list[Tensor | None]] = []
        self.rows: list[list[float]] = []
        self.centres: list[bool] = []


def _row(
    kind: str, optimizer, group: dict[str, Any], p: Tensor, first: bool, l2: float, mul: float
) -> list[float]:
    """The scalar row of ``p`` for this step (also advances Adam's step count)."""
    if kind == "sgd":
        damp = 1.0 if first else 1.0 - group["dampening"]
        coefs = (1.0, group["momentum"]) if group["nesterov"] else (0.0, 1.0)
        return [float(group["lr"]), group["momentum"], damp, l2, mul, *coefs]
    step_t = optimizer.state[p]["step"]
    step_t += 1
    step = float(step_t)
    beta1, beta2 = group["betas"]
    lr = float(group["lr"])
    # Same double-precision scalars as torch's for-loop Adam.
    step_size = lr / (1 - beta1**step)
    bc2_sqrt = math.sqrt(1 - beta2**step)
    return [step_size, 1 - beta1, beta2, 1 - beta2, group["eps"], l2, bc2_sqrt, mul]


# Inside a compiled train step Dynamo graph-breaks here and runs this step as in
# eager mode, calling its own compiled kernels: traced inline, it recompiled at
# every step and drifted from the eager result (5.7e-3 after three AdamW steps,
# measured on torch 2.14; docs/TRAINING_LOOPS.md).
@torch.compiler.disable
@torch.no_grad()
def fused_step(optimizer: torch.optim.Optimizer) -> None:
    """One GC + update step of a gradcent SGD/SGDW/Adam/AdamW, fused and compiled.

    One compiled call per parameter, on a few small graphs shared by all shapes.
    (One call per group over lists was measured slower: its compile time grew
    with the number of tensors, 42 s for 7 and 173 s for 28, and its steps were
    slower too.)

    Args:
        optimizer: a gradcent optimizer built with ``impl="fused"``.

    References:
        Yong et al., ECCV 2020, Algorithms 1-2 and §3.4.

    """
    kind = kernel_kind(optimizer)
    gc = optimizer._gc
    # P is idempotent, so gradients centred earlier by centralize_grads() (and
    # maybe clipped since) give P(Pg + λw) = Pg + λP(w): the default path's rule.
    gc.discard_pending()
    cache = optimizer.__dict__.setdefault("_fused_rows", {})
    for group in optimizer.param_groups:
        terms = decay_terms(optimizer, group)
        l2, mul = terms.l2, terms.shrink(float(group["lr"]))
        maximize = group.get("maximize", False)
        batches: dict[tuple, _Batch] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            spec = gc.spec(p, group)
            if p.grad.is_sparse:
                raise ValueError("impl='fused' needs dense gradients")
            g = -p.grad if maximize else p.grad
            state, first = loop_state(optimizer, kind, group, p)
            row = _row(kind, optimizer, group, p, first, l2, mul)
            pd = p.detach()
            if is_dtensor(pd):
                # FSDP2: the kernels run on this rank's shard (a DTensor has no
                # storage to alias). Units split across shards get ĝ from
                # centralize's all-reduce first, then a plain update.
                if spec is not None and _splits_units(pd, spec):
                    g = centralize(g + row[_slot(kind, "l2")] * pd, spec.dims, spec.groups)
                    row[_slot(kind, "l2")], spec = 0.0, None
                pd, g, state = pd.to_local(), g.to_local(), [t.to_local() for t in state]
            if _fast(pd, [g, *state], spec):
                centre = spec is not None
                cols = [_cached_rows(cache, p, pd, centre), _rows(g, centre)]
                cols += [_cached_rows(cache, t, t, centre) for t in state]
            else:
                # Rare layouts (ConvTranspose groups, mismatched strides): ĝ eagerly,
                # then the same kernel with no centring and no L2 on it.
                if spec is not None:
                    g = centralize(g + row[_slot(kind, "l2")] * pd, spec.dims, spec.groups)
                    row[_slot(kind, "l2")] = 0.0
                _run_eager(kind, group, [pd, g, *state], row)
                continue
            key = (p.device, p.dtype)
            batch = batches.setdefault(key, _Batch())
            batch.cols.append(cols)
            batch.rows.append(row)
            batch.centres.append(centre)
        for (device, _), batch in batches.items():
            _launch(kind, group, batch, _scalars(batch.rows, device))


def _splits_units(t: Tensor, spec: Spec) -> bool:
    """True when a mesh dim shards one of the dims a unit spans (DTensor ``t``)."""
    from torch.distributed.tensor import Shard

    return any(isinstance(pl, Shard) and pl.dim in spec.dims for pl in t.placements)


def _slot(kind: str, name: str) -> int:
    return (_SGD_SLOTS if kind == "sgd" else _ADAM_SLOTS).index(name)


def _split(kind: str, group: dict[str, Any], cols: list[Tensor]) -> list[Tensor | None]:
    """Kernel argument order: p, g, then the state (None where a slot is unused)."""
    if kind == "sgd":
        return [cols[0], cols[1], cols[2] if len(cols) > 2 else None]
    return [cols[0], cols[1], cols[2], cols[3], cols[4] if len(cols) > 4 else None]


def _run_eager(kind: str, group: dict[str, Any], cols: list[Tensor], row: list[float]) -> None:
    s = torch.tensor(row, dtype=torch.float32, device=cols[0].device)
    args = _split(kind, group, cols)
    _EAGER[kind](*args, s, False)


def _launch(kind: str, group: dict[str, Any], batch: _Batch, ss: list[Tensor]) -> None:
    """One compiled call per parameter of the batch."""
    fn = compiled_kernel(f"{kind}_one")
    for cols, s, centre in zip(batch.cols, ss, batch.centres, strict=True):
        fn(*_split(kind, group, cols), s, centre)


register("fused", fused_step)
