"""Gradient Centralization for other frameworks and trainers.

Each module here imports its optional dependency itself, so importing
:mod:`gradcent` never requires jax, keras, lightning or transformers:

* :mod:`gradcent.integrations.optax`: an optax ``GradientTransformation`` for
  JAX (Flax Linen/NNX, Haiku), with per-layer output axes.
* :mod:`gradcent.integrations.keras`: GC for any Keras 3 optimizer, on every
  backend.

Kernel layouts (where the output axis sits) are decided by
:mod:`gradcent.layouts`, using the same mode rules as :mod:`gradcent.rules`.

References:
    Yong et al., ECCV 2020, arXiv:2004.01461.

"""
