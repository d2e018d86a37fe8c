"""gradcent: Gradient Centralization (Yong et al., ECCV 2020) done right.

The layers, each importing only from the ones above it: :mod:`gradcent.core`
(the operator), :mod:`gradcent.rules` (which parameters, which axes),
:mod:`gradcent.optim` (optimizers and :func:`attach`), then distributed,
integrations and experiments.
"""

from gradcent.core import centralize, centralize_, centralize_many_, unit_size
from gradcent.optim import SGD, SGDW, Adagrad, Adam, AdamW, GCHandle, attach
from gradcent.rules import Plan, Spec, plan

__version__ = "0.1.0"

__all__ = [
    "centralize",
    "centralize_",
    "centralize_many_",
    "unit_size",
    "plan",
    "Plan",
    "Spec",
    "attach",
    "GCHandle",
    "SGD",
    "SGDW",
    "Adam",
    "AdamW",
    "Adagrad",
]
