"""``MODULE:FUNCTION`` plugins: a user's model or dataset, found by name.

``--model mymodule:build`` and ``--dataset mymodule:data`` import ``mymodule``
with the current directory first on ``sys.path`` (so a file next to where the
command runs is found, as ``python -m`` would) and take its ``build`` / ``data``.
Functions registered from Python (:func:`register`) are found first, so the
Python API can pass a function object that has no importable name.

References:
    docs/DATASETS.md ("Your own data and model").

"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

# Functions handed over by the Python API, by the name written into the config.
_REGISTERED: dict[str, Callable] = {}


def register(fn: Callable, kind: str) -> str:
    """Make ``fn`` loadable by name and return that name (``module:qualname``).

    Args:
        fn: the model builder or dataset function.
        kind: ``"model"`` or ``"dataset"`` (kept apart, so one name can be both).

    Returns:
        The ``MODULE:FUNCTION`` name recorded in the run's config.

    """
    name = f"{getattr(fn, '__module__', None) or 'python'}:{getattr(fn, '__qualname__', 'fn')}"
    _REGISTERED[f"{kind}/{name}"] = fn
    return name


def load_plugin(spec: str, kind: str, error: type[Exception] = ValueError) -> Callable:
    """The function named by ``spec`` (``"module:function"``, ``function`` may be dotted).

    Args:
        spec: the ``MODULE:FUNCTION`` string.
        kind: ``"model"`` or ``"dataset"``, for messages and the registry.
        error: the exception class to raise.

    Returns:
        The callable.

    Raises:
        error: malformed spec, module not found, no such function, not callable.

    """
    if f"{kind}/{spec}" in _REGISTERED:
        return _REGISTERED[f"{kind}/{spec}"]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise error(
            f"Invalid {kind} plugin {spec!r}: expected MODULE:FUNCTION, e.g. mymodule:build"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise error(
                f"{kind} plugin {spec!r}: module {module_name!r} not found (looked in the "
                f"current directory {cwd} and on sys.path)"
            ) from err
        raise error(f"{kind} plugin {spec!r}: importing {module_name!r} failed: {err}") from err
    except Exception as err:  # the user's module is broken: say so, keep the cause
        raise error(
            f"{kind} plugin {spec!r}: importing {module_name!r} failed: {type(err).__name__}: {err}"
        ) from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{kind} plugin {spec!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{kind} plugin {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj
