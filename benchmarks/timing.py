"""Round-robin timing: every case runs once per round, so drift hits all alike.

CPU: ``time.perf_counter``. CUDA: CUDA events around each call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_once(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of ``fn`` takes on ``device``."""
    if device.startswith("cuda"):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def measure(
    cases: dict[str, Callable[[], object]], device: str, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per case, the cases interleaved round by round."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + repeats):
        for name, fn in cases.items():
            t = time_once(fn, device)
            if r >= warmup:
                samples[name].append(t)
    return {name: statistics.median(ts) for name, ts in samples.items()}
