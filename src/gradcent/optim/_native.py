"""The native step: GC and the update in one hand-written C++ pass over memory (CPU).

``impl="native"`` builds ``_native.cpp`` once per machine with
``torch.utils.cpp_extension.load_inline`` (about a minute on 2 cores; cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and runs one
kernel call per param group: every float32 CPU parameter, centred or not, is
updated by one multi-threaded pass. For each unit (row) the kernel sums
ĝ = g + λw, then updates that row while it is still in L1/L2, so GC adds no
memory traffic and a few arithmetic operations per element to torch's own fused
step. Parameters the kernel does not take (fp16/bf16, CUDA, grouped
ConvTranspose, other memory layouts) are handed back by the kernel and take,
in the same step, the default path's step (:func:`._impl.step_leftovers`: GC
in place, coupled decay folded, then torch's own step for just those).

Building needs a C++ compiler (``g++``) and ``ninja`` (``pip install ninja``);
when either is missing the optimizer's constructor raises and names both.

References:
    Yong et al., ECCV 2020, Algorithm 1 (SGDM + GC), Algorithm 2 (Adam + GC),
    §3.4 (ĝ = P(g + λw)).

"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import platform
import sys
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradcent.optim._impl import (
    check_param,
    check_step,
    decay_terms,
    fused_state,
    register,
    step_leftovers,
)

_SOURCE = Path(__file__).with_name("_native.cpp")
# On x86, GCC's -march=native for AVX-512 CPUs still prefers 256-bit vectors; asking for
# 512 made the GC+SGDM kernel 0.93x torch's fused SGD on ResNet-50 (0.97x on the 355M
# set) where 256 gave 1.01x, 0 of 11-15 interleaved rounds above torch (2026-12-02,
# Xeon with AVX-512, 2 threads). A CPU without AVX-512 ignores the preference.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
_CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp") + (
    ("-mprefer-vector-width=512",) if _X86 else ()
)
_LDFLAGS = ("-fopenmp",)
_BUILD: dict[str, object] = {}  # "ops" once loaded, "error" once a build failed
_PLAIN = (Tensor, torch.nn.Parameter)


def _cpu_signature() -> str:
    """The CPU's model and feature flags (``-march=native`` builds differ per CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def build_name() -> str:
    """The extension's name: a hash of source, flags, CPU and torch version.

    Returns:
        ``"gradcent_native_<12 hex digits>"``; a cached build is reused only on
        a machine where all four match.

    """
    h = hashlib.sha256(_SOURCE.read_bytes())
    for part in (*_CFLAGS, *_LDFLAGS, _cpu_signature(), torch.__version__, sys.version):
        h.update(part.encode())
    return f"gradcent_native_{h.hexdigest()[:12]}"


def _is_built(name: str) -> bool:
    """Whether a build of ``name`` is cached (to say "building..." only when it is not).

    torch builds in ``$TORCH_EXTENSIONS_DIR/<name>`` or, without that variable, in
    a python/accelerator subfolder of its default root; both are looked at.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    so = f"{name}.so"
    return (root / name / so).exists() or any(root.glob(f"*/{name}/{so}"))


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """Put this interpreter's scripts folder (a venv's ``ninja``) on PATH while building."""
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), saved])
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def load():
    """Build (first time on a machine) and load the kernels.

    Returns:
        ``torch.ops.gradcent_native``: ``adam_``, ``sgd_`` and ``centralize_``.

    Raises:
        RuntimeError: when the build fails, naming what it needs; the failure is
            remembered, so later calls raise at once.

    """
    if "ops" in _BUILD:
        return _BUILD["ops"]
    if "error" in _BUILD:
        raise RuntimeError(_BUILD["error"])
    name = build_name()
    if not _is_built(name):
        print(
            "gradcent: building the native CPU kernel for impl='native' "
            "(once per machine, about a minute)...",
            file=sys.stderr,
            flush=True,
        )
    try:
        from torch.utils.cpp_extension import load_inline

        with _ninja_on_path():
            load_inline(
                name=name,
                cpp_sources=[_SOURCE.read_text()],
                is_python_module=False,
                extra_cflags=list(_CFLAGS),
                extra_ldflags=list(_LDFLAGS),
            )
    except Exception as exc:  # compiler, ninja or linker missing: say so, once
        _BUILD["error"] = (
            f"impl='native' could not build its C++ kernel ({type(exc).__name__}: {exc}). "
            "It needs a C++ compiler (g++) and ninja (pip install ninja); "
            "impl='default' needs neither."
        )
        raise RuntimeError(_BUILD["error"]) from exc
    _BUILD["ops"] = torch.ops.gradcent_native
    return _BUILD["ops"]


def rows_hint(shape: Sequence[int], spec) -> int:
    """The ``rows`` value the kernels get for a parameter of this shape and spec.

    Args:
        shape: the parameter's shape.
        spec: its :class:`~gradcent.rules.Spec`, None when it is not centred.

    Returns:
        The number of units (rows) to centre when the units run along dim 0
        (every other dim reduced, no groups) with M > 1 elements each; 0 when
        nothing is centred (no spec, M = 1 where P is the identity, or no
        elements); -1 when the kernels cannot centre it (grouped
        ConvTranspose, an output axis other than 0), so it takes the slow path.
        The kernels check the memory layout themselves.

    """
    return 0 if spec is None else _rows_of(tuple(shape), tuple(spec.dims), spec.groups)


# Keyed by plain tuples (hashed and compared in C): every step asks again.
@functools.lru_cache(maxsize=4096)
def _rows_of(shape: tuple[int, ...], dims: tuple[int, ...], groups: int) -> int:
    """:func:`rows_hint` of a centred parameter, from its shape and its spec's dims and groups."""
    if groups != 1 or len(shape) < 2 or dims != tuple(range(1, len(shape))):
        return -1
    m = math.prod(shape[1:])
    return shape[0] if m > 1 and shape[0] > 0 else 0


def _hint(gc, group: dict[str, Any], p: Tensor, cache: dict) -> int:
    """:func:`rows_hint` of ``p`` in ``group``, cached per (parameter, mode, shape)."""
    mode = group.get("gc", gc.plan.mode)
    key = (id(p), mode)
    hit = cache.get(key)
    if hit is not None and hit[0]() is p and hit[1] == p.shape:
        return hit[2]
    spec = gc.spec(p, group)
    rows = rows_hint(p.shape, spec)
    cache[key] = (weakref.ref(p), p.shape, rows)
    return rows


# Inside a compiled train step Dynamo graph-breaks here and runs the step eagerly:
# the C++ kernel has no fake tensor rule, and the eager step is the result a
# compiled step must give (docs/TRAINING_LOOPS.md).
@torch.compiler.disable
@torch.no_grad()
def native_step(optimizer: torch.optim.Optimizer) -> None:
    """One GC + update step of a gradcent SGD/SGDW/Adam/AdamW, native kernel first.

    Per group, one kernel call takes every parameter it can; the ones it hands
    back (other dtypes or devices, layouts, grouped ConvTranspose) take
    :func:`gradcent.optim._impl.step_leftovers` in the same step.

    Args:
        optimizer: a gradcent optimizer built with ``impl="native"``.

    Raises:
        ValueError: for sparse gradients, DTensor parameters or GradScaler's
            fused-step scaling, which this path does not implement.

    References:
        Yong et al., ECCV 2020, Algorithms 1-2 and §3.4.

    """
    kind = check_step(optimizer)
    gc = optimizer._gc
    # P is idempotent: gradients centred earlier by centralize_grads() (maybe
    # clipped since) give P(Pg + λw) = Pg + λP(w), the default path's rule.
    gc.discard_pending()
    ops = load()
    cache = optimizer.__dict__.setdefault("_native_rows", {})
    for group in optimizer.param_groups:
        # Lean on purpose: this loop runs for every parameter at every step.
        ps: list[Tensor] = []
        gs: list[Tensor] = []
        cols: tuple[list[Tensor], ...] = ([], [], [], [])
        rows: list[int] = []
        first: list[bool] = []  # SGD with momentum: the buffer is new
        fresh: list[bool] = []  # the state was made here for the kernel
        slow: list[Tensor] = []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if type(p) not in _PLAIN or type(g) not in _PLAIN or g.is_sparse:
                check_param(p, optimizer.impl)  # raises for sparse grads and DTensor
                slow.append(p)
                continue
            rows.append(_hint(gc, group, p, cache))
            ps.append(p)
            gs.append(g)
            fresh.append(_gather(optimizer, kind, group, p, cols, first))
        if ps:
            skipped = _call(ops, kind, group, optimizer, ps, gs, cols, rows, first)
            for i in skipped:
                if fresh[i]:
                    # Made here, never filled: torch's step makes its own, in its layout.
                    del optimizer.state[ps[i]]
                slow.append(ps[i])
        if slow:
            step_leftovers(optimizer, group, slow)


def _gather(optimizer, kind: str, group, p: Tensor, cols, first: list[bool]) -> bool:
    """Append ``p``'s state tensors to ``cols`` (made when missing, as torch's fused step).

    Returns:
        Whether the state was made here.

    """
    st = optimizer.state.get(p)
    if kind == "adam":
        made = not st
        if made:
            fused_state(optimizer, kind, group, p)
            st = optimizer.state[p]
        cols[0].append(st["exp_avg"])
        cols[1].append(st["exp_avg_sq"])
        if group["amsgrad"]:
            cols[2].append(st["max_exp_avg_sq"])
        cols[3].append(st["step"])  # the kernel hands back a step it cannot use
        return made
    if group["momentum"]:
        states, made = fused_state(optimizer, kind, group, p)
        cols[0].append(states[0])
        first.append(made)
        return made
    return False


def _call(ops, kind, group, optimizer, ps, gs, cols, rows, first) -> list[int]:
    """One kernel call for a group; returns the indices it did not take."""
    # ĝ = P(s·g + l2·w) with coupled L2; the decoupled decay (SGDW, AdamW) shrinks w.
    terms = decay_terms(optimizer, group)
    lr, maximize = float(group["lr"]), bool(group.get("maximize", False))
    l2, shrink = terms.l2, terms.shrink(lr)
    if kind == "sgd":
        return ops.sgd_(
            ps,
            gs,
            cols[0],
            rows,
            first,
            lr,
            float(group["momentum"]),
            float(group["dampening"]),
            l2,
            shrink,
            bool(group["nesterov"]),
            maximize,
        )
    beta1, beta2 = group["betas"]
    return ops.adam_(
        ps,
        gs,
        cols[0],
        cols[1],
        cols[2],
        cols[3],
        rows,
        lr,
        float(beta1),
        float(beta2),
        float(group["eps"]),
        l2,
        shrink,
        bool(group["amsgrad"]),
        maximize,
    )


def centralize_many_(todo: Sequence[tuple[Tensor, Any]]) -> list[tuple[Tensor, Any]]:
    """Centre, in one kernel call, every (gradient, spec) the kernel takes.

    Args:
        todo: (tensor, spec) pairs to centralize in place.

    Returns:
        The pairs the kernel did not take (other dtypes, devices or layouts),
        untouched, for :func:`gradcent.core.centralize_`.

    """
    picked = [(t, s) for t, s in todo if type(t) in _PLAIN]
    rest = [(t, s) for t, s in todo if type(t) not in _PLAIN]
    if picked:
        rows = [_rows_of(t.shape, tuple(s.dims), s.groups) for t, s in picked]
        skipped = load().centralize_([t for t, _ in picked], rows)
        rest += [picked[i] for i in skipped]
    return rest


register("native", native_step, centralize_many=centralize_many_, prepare=load)
