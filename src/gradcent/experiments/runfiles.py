"""Reading a run's files safely: checkpoints, results and RNG states.

A checkpoint is read with ``torch.load(..., weights_only=True)``: the unpickler
then builds only tensors and plain Python values (dict, list, tuple, str, int,
float, bool, None and a few torch types), so a file someone else made cannot run
code when it is opened. gradcent's own checkpoints therefore hold nothing else:
the RNG states of numpy and python's ``random`` are stored as tensors and plain
values (:func:`rng_state`), and any field added later must be too (a dict of
tensors is fine).

Every failure is a :class:`RunFileError` (a ``ValueError``) naming the file and
what is wrong with it, which the CLI prints without a traceback.

References:
    PyTorch docs, ``torch.load`` (``weights_only``) and "Serialization semantics".

"""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch


class RunFileError(ValueError):
    """A checkpoint, result or config file that cannot be used; the message names it."""


def rng_state() -> dict[str, Any]:
    """The RNG states of torch, numpy and python's ``random`` as tensors and plain values.

    numpy's and python's states are tuples holding a numpy array or 625 ints;
    they are stored as int64 tensors so that the checkpoint loads under
    ``weights_only=True`` and :func:`set_rng_state` restores them exactly.

    Returns:
        ``{"torch": ByteTensor, "numpy": {...}, "python": {...}}`` and ``"cuda"``
        (one ByteTensor per device) when CUDA is available.

    """
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state` (bit for bit)."""
    torch.set_rng_state(state["torch"].cpu())
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].cpu().numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _first_line(err: BaseException) -> str:
    """The error's first sentence, with its type when the text alone says little."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    if isinstance(err, (RuntimeError, pickle.UnpicklingError)) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _unsafe_global(err: pickle.UnpicklingError) -> str | None:
    """The object torch's weights-only unpickler refused (``exec``, ``numpy.dtype``, ...)."""
    m = re.search(r"Unsupported (?:global: GLOBAL|class) ([\w.]+)", str(err))
    return m.group(1).rstrip(".") if m else None


def _unpickler_error(err: pickle.UnpicklingError) -> str:
    """The line of torch's message that says what it could not decode."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error"):
            rest = line.partition(":")[2].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else line)
    return _first_line(err)


def load_torch_file(path: str | Path, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Args:
        path: the file.
        map_location: as for ``torch.load``.
        what: what the file is, for the messages (``"checkpoint"``, ...).

    Returns:
        The loaded object (tensors and plain Python values only).

    Raises:
        RunFileError: missing or unreadable file, a truncated or corrupt one,
            or one holding other Python objects (refused unopened: unpickling
            them could run code).

    References:
        PyTorch docs, ``torch.load`` (``weights_only``).

    """
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"{what.capitalize()} not found: {path} (expected a file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        name = _unsafe_global(err)
        if name is None:  # not a refusal: an opcode or structure torch cannot decode
            raise RunFileError(
                f"{path} is not a readable {what} (truncated or corrupt: {_unpickler_error(err)})"
            ) from None
        hint = (
            " (gradcent checkpoints written before RNG states were stored as tensors "
            "hold numpy's state as an array: start that run again)"
            if name.startswith("numpy")
            else ""
        )
        raise RunFileError(
            f"Refused to load {path}: it holds {name}, which is not a tensor or a plain "
            f"value, and unpickling it could run code{hint}. A {what} must hold only "
            "tensors and plain values, e.g. torch.save(model.state_dict(), path)"
        ) from None
    except OSError as err:
        raise RunFileError(f"Cannot read {what} {path}: {err.strerror or err}") from None
    except Exception as err:  # zip reader, EOF, bad pickle opcodes: all mean a bad file
        raise RunFileError(
            f"{path} is not a readable {what} (truncated or corrupt: {_first_line(err)})"
        ) from None


def require_keys(doc: Any, keys: tuple[str, ...], path: Path, what: str) -> dict[str, Any]:
    """``doc`` itself when it is a dict holding ``keys``.

    Raises:
        RunFileError: naming the file and the missing keys (or the wrong type).

    """
    if not isinstance(doc, dict):
        raise RunFileError(f"{path} holds a {type(doc).__name__}, not a {what} (expected a dict)")
    missing = [k for k in keys if k not in doc]
    if missing:
        raise RunFileError(f"{path} is not a complete {what}: it lacks {', '.join(missing)}")
    return doc


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The parsed JSON of ``path``, or an error naming the file and the parse error.

    Raises:
        RunFileError: unreadable file or invalid JSON (with line and column).

    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise RunFileError(f"Cannot read {what} {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise RunFileError(f"{path} is not a {what} (not UTF-8 text: {err.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RunFileError(f"{path} is not a valid {what} (truncated or corrupt: {err})") from None
