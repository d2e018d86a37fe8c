"""The experiment harness: datasets, models, presets, training and reports.

Depends on the library (core, rules, optim), never the reverse. Submodules are
imported explicitly (``from gradcent.experiments.datasets import build_dataset``)
so that importing this package stays cheap. The one exception is the Python
API :func:`gradcent.experiments.compare(model=..., train=..., test=..., ...)
<gradcent.experiments.comparison.compare>`, loaded on first use.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy: the comparison module imports torch, matplotlib and scipy.
    if name == "compare":
        from gradcent.experiments.comparison import compare

        return compare
    raise AttributeError(f"module 'gradcent.experiments' has no attribute {name!r}")
