"""PyTorch optimizers with Gradient Centralization, and :func:`attach` for any other."""

from gradcent.optim._impl import IMPLS
from gradcent.optim.adagrad import Adagrad
from gradcent.optim.adam import Adam, AdamW
from gradcent.optim.attach import GCHandle, attach
from gradcent.optim.sgd import SGD, SGDW

__all__ = ["IMPLS", "SGD", "SGDW", "Adam", "AdamW", "Adagrad", "attach", "GCHandle"]
