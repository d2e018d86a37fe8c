"""The blocked step: GC and torch's own fused kernel, one cache-sized block at a time.

``impl="blocked"`` walks each large centred parameter in blocks of whole rows
(units) of about :data:`gradcent.core.BLOCK_BYTES` of gradient. For each block
it computes ĝ = P(g + αw) into a small scratch buffer (the same decay folding
as the default path, α = ±λ for coupled decay), then calls torch's fused kernel
(``torch._fused_adam_``, ``torch._fused_adamw_``, ``torch._fused_sgd_``) on the
views of p, ĝ and the state of that block, while ĝ is still in cache. Memory
traffic is that of torch's fused step: the gradient is read once and never
written.

Small centred parameters (and rare layouts: grouped ConvTranspose,
non-contiguous) are centred in place exactly as the default path does, and go
with every non-centred parameter through one multi-tensor kernel call per group
(the gradient of a blocked parameter is left untouched; a small one is centred).
The state is torch's fused state (:func:`._impl.fused_state`: ``step`` a
float32 tensor on the parameter's device, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``, ``momentum_buffer``), so state dicts move freely between impls.

References:
    Yong et al., ECCV 2020, Algorithm 1 (SGDM + GC), Algorithm 2 (Adam + GC),
    §3.4 (ĝ = P(g + λw)).

"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradcent.core import _LOW_PRECISION, BLOCK_BYTES, _subtract_mean_, centralize_, row_blocks
from gradcent.optim._impl import (
    check_param,
    check_step,
    decay_terms,
    fused_state,
    has_decoupled_decay,
    register,
)


class _Lists:
    """Arguments of one multi-tensor kernel call."""

    def __init__(self) -> None:
        self.ps: list[Tensor] = []
        self.gs: list[Tensor] = []
        self.states: list[list[Tensor]] = []


def _kernel(kind, optimizer, group, ps, gs, states, step, wd: float, first: bool) -> None:
    """Torch's fused kernel on lists of tensors (one block or one batch)."""
    maximize = group.get("maximize", False)
    if kind == "sgd":
        torch._fused_sgd_(
            ps,
            gs,
            [s[0] for s in states] if group["momentum"] else [],
            weight_decay=wd,
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=maximize,
            is_first_step=first,
            grad_scale=None,
            found_inf=None,
        )
        return
    fn = torch._fused_adamw_ if has_decoupled_decay(optimizer, group) else torch._fused_adam_
    beta1, beta2 = group["betas"]
    fn(
        ps,
        gs,
        [s[0] for s in states],
        [s[1] for s in states],
        [s[2] for s in states] if group["amsgrad"] else [],
        step,
        amsgrad=group["amsgrad"],
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        weight_decay=wd,
        eps=group["eps"],
        maximize=maximize,
        grad_scale=None,
        found_inf=None,
    )


def _centred_into(out: Tensor, g: Tensor, w: Tensor, alpha: float) -> Tensor:
    """Write P(g + αw) into ``out`` on (units, M) rows, fp32 means for fp16/bf16."""
    if alpha:
        torch.add(g, w, alpha=alpha, out=out)
    elif g.dtype not in _LOW_PRECISION:
        # One op fewer: the mean reads g, the subtraction re-reads it from cache.
        return torch.sub(g, g.mean(1, keepdim=True), out=out)
    else:
        out.copy_(g)
    _subtract_mean_(out, (1,))
    return out


def _fold_in_place(g: Tensor, w: Tensor, alpha: float, spec) -> None:
    """As the default path: g ← P(g + αw) − αw in place (just P g without decay)."""
    if not alpha:
        centralize_(g, spec.dims, spec.groups)
        return
    decay = w * alpha
    g.add_(decay)
    centralize_(g, spec.dims, spec.groups)
    g.sub_(decay)


def _rows_ok(p: Tensor, tensors: list[Tensor], spec) -> bool:
    """True when ``p``'s units are its contiguous rows and grad/state share its layout."""
    if p.numel() == 0 or p.dim() < 2 or not p.is_contiguous():
        return False
    if spec.groups != 1 or tuple(spec.dims) != tuple(range(1, p.dim())):
        return False
    return all(t.is_contiguous() and t.shape == p.shape for t in tensors)


# Inside a compiled train step Dynamo graph-breaks here and runs the step eagerly:
# the kernels (torch's fused ones on views, the C++ one) have no fake tensor rule,
# and the eager step is the result a compiled step must give (docs/TRAINING_LOOPS.md).
@torch.compiler.disable
@torch.no_grad()
def blocked_step(optimizer: torch.optim.Optimizer) -> None:
    """One GC + update step of a gradcent SGD/SGDW/Adam/AdamW, block by block.

    Args:
        optimizer: a gradcent optimizer built with ``impl="blocked"``.

    Raises:
        ValueError: for sparse gradients, DTensor parameters or GradScaler's
            fused-step scaling, which this path does not implement.

    References:
        Yong et al., ECCV 2020, Algorithms 1-2 and §3.4.

    """
    kind = check_step(optimizer)
    # P is idempotent: gradients centred earlier by centralize_grads() (maybe
    # clipped since) give P(Pg + αw) = Pg + αP(w), the default path's rule.
    optimizer._gc.discard_pending()
    for group in optimizer.param_groups:
        blocked_group(optimizer, kind, group, group["params"])


def blocked_group(optimizer, kind: str, group: dict[str, Any], params) -> None:
    """The blocked step of ``params`` (all or some of ``group``'s parameters).

    Args:
        optimizer: a gradcent SGD/SGDW/Adam/AdamW (``impl="blocked"``, or
            ``"native"`` for the parameters its kernel does not take).
        kind: ``"sgd"`` or ``"adam"``.
        group: the param group, for its options.
        params: the parameters to step; those without a gradient are skipped.

    """
    impl = optimizer.impl
    gc = optimizer._gc
    terms = decay_terms(optimizer, group)
    # α: coupled decay folded into ĝ (negated when maximizing, as torch negates g).
    alpha = terms.alpha(group.get("maximize", False))
    # SGDW shrinks the weights here; AdamW's kernel does (weight_decay=λ).
    shrink = terms.shrink(float(group["lr"])) if kind == "sgd" else 1.0
    kernel_wd_centred = terms.decoupled if kind == "adam" else 0.0
    # Small parameters get g' = P(g + αw) − αw: the kernel adds its own λw back.
    kernel_wd_plain = terms.l2 + kernel_wd_centred
    batches: dict[tuple, _Lists] = {}
    for p in params:
        if p.grad is None:
            continue
        check_param(p, impl)
        spec = gc.spec(p, group)
        states, first = fused_state(optimizer, kind, group, p)
        step = [optimizer.state[p]["step"]] if kind == "adam" else []
        if step:
            step[0] += 1  # once per step, before any block, as torch does
        pd, g = p.detach(), p.grad
        if g.stride() != pd.stride():
            # torch's fused kernels walk raw memory: a gradient laid out unlike its
            # parameter (channels_last grad, contiguous weight) updates the wrong
            # elements (torch 2.14 SGD(fused=True) too). Step on a copy in p's layout.
            g = torch.empty_like(pd).copy_(g)
        if shrink != 1.0:
            pd.mul_(shrink)
        if spec is None:
            key = (p.device, p.dtype, first)
        elif _rows_ok(pd, [g, *states], spec) and g.numel() * g.element_size() > BLOCK_BYTES:
            _blocks(kind, optimizer, group, pd, g, states, step, alpha, kernel_wd_centred, first)
            continue
        else:
            # Small or rare layouts: the default path's in-place GC of p.grad,
            # g' = P(g + αw) − αw, then the kernel adds its own decay as usual.
            _fold_in_place(g, pd, alpha, spec)
            key = (p.device, p.dtype, first)
        lists = batches.setdefault(key, _Lists())
        lists.ps.append(pd)
        lists.gs.append(g)
        lists.states.append(states + step)
    for (_, _, first), lists in batches.items():
        steps = [s[-1] for s in lists.states] if kind == "adam" else []
        states = [s[:-1] for s in lists.states] if kind == "adam" else lists.states
        _kernel(kind, optimizer, group, lists.ps, lists.gs, states, steps, kernel_wd_plain, first)


def _blocks(kind, optimizer, group, p, g, states, step, alpha, wd, first) -> None:
    """ĝ and the kernel, one block of whole rows at a time (ĝ stays in cache)."""
    units = p.shape[0]
    rows = [t.view(units, -1) for t in (p, g, *states)]
    scratch = None
    for blocks in zip(*(row_blocks(r, BLOCK_BYTES) for r in rows), strict=True):
        pb, gb, *sb = blocks
        if scratch is None or scratch.shape != gb.shape:
            scratch = torch.empty_like(gb)
        ghat = _centred_into(scratch, gb, pb, alpha)
        _kernel(kind, optimizer, group, [pb], [ghat], [sb], step, wd, first)


register("blocked", blocked_step)
