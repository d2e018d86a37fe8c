"""The experiment harness: datasets, models, presets, training and reports.

Depends on the library (core, rules, optim), never the reverse. Submodules are
imported explicitly (``from gradcent.experiments.datasets import build_dataset``)
so that importing this package stays cheap.
"""
