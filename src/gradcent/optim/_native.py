"""The native step: GC and the update in one hand-written C++ pass over memory (CPU).

``impl="native"`` builds ``_native.cpp`` once per machine with
``torch.utils.cpp_extension.load_inline`` (about 40 s on 2 cores; cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and runs one
kernel call per param group: every float32 CPU parameter, centred or not, is
updated by one multi-threaded pass. For each unit (row) the kernel sums
ĝ = g + λw, then updates that row while it is still in L1/L2, so GC adds no
memory traffic and a few arithmetic operations per element to torch's own fused
step. Parameters the kernel does not take (fp16/bf16, CUDA, grouped
ConvTranspose, other memory layouts) go through :mod:`._blocked`'s path: GC in
place, then torch's fused kernel.

Building needs a C++ compiler (``g++``) and ``ninja`` (``pip install ninja``);
when either is missing the optimizer's constructor raises and names both.

References:
    Yong et al., ECCV 2020, Algorithm 1 (SGDM + GC), Algorithm 2 (Adam + GC),
    §3.4 (ĝ = P(g + λw)).

"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("_native.cpp")
_CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_state: dict[str, object] = {}


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


def _build_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


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
    if "ops" in _state:
        return _state["ops"]
    if "error" in _state:
        raise RuntimeError(_state["error"])
    name = build_name()
    if not (_build_root() / name / f"{name}.so").exists():
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
        _state["error"] = (
            f"impl='native' could not build its C++ kernel ({type(exc).__name__}: {exc}). "
            "It needs a C++ compiler (g++) and ninja (pip install ninja); "
            "impl='blocked' and impl='default' need neither."
        )
        raise RuntimeError(_state["error"]) from exc
    _state["ops"] = torch.ops.gradcent_native
    return _state["ops"]


def unit_rows(p: Tensor, others: Sequence[Tensor], spec) -> int | None:
    """How the kernel takes ``p``: its number of GC rows, 0 (not centred) or None.

    The kernel takes float32 CPU tensors that are dense in memory, laid out
    alike (``others``: gradient and state), whose units, when centred, are
    contiguous runs of M > 1 elements: the default layout and channels_last,
    with the output axis first (``spec.dims`` all the others, no groups).

    Args:
        p: the parameter (or a gradient, for the GC pass).
        others: tensors the kernel reads or writes beside ``p``.
        spec: the parameter's :class:`~gradcent.rules.Spec`, None when not centred.

    Returns:
        The number of rows (units) to centre, 0 to update without centring, or
        None when the kernel does not take this parameter.

    """
    tensors = (p, *others)
    if any(type(t) not in (Tensor, torch.nn.Parameter) for t in tensors):
        return None  # DTensor and other subclasses
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    channels_last = p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
    dense = p.is_contiguous() or channels_last
    if not dense or any(t.shape != p.shape or t.stride() != p.stride() for t in others):
        return None
    if spec is None or p.numel() == 0:
        return 0
    if spec.groups != 1 or p.dim() < 2 or tuple(spec.dims) != tuple(range(1, p.dim())):
        return None
    units = p.shape[0]
    m = p.numel() // units
    if p.stride(0) != m:
        return None
    return units if m > 1 else 0  # M = 1: P is the identity, as in core.centralize_
