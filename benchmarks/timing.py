"""Round-robin timing: every case runs once per round, so drift hits all alike.

Within a round the order is shuffled (a fixed seed): a case that runs right
after another pays for what that one left behind (dirty cache lines to write
back, evicted data), and a fixed order would charge it to the same case in
every round.

CPU: ``time.perf_counter``. CUDA: CUDA events around each call.
"""

from __future__ import annotations

import random
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


def measure_rounds(
    cases: dict[str, Callable[[], object]], device: str, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of every case in every timed round, the cases interleaved round by round."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    rng = random.Random(0)
    for r in range(warmup + repeats):
        rng.shuffle(order)
        for name in order:
            t = time_once(cases[name], device)
            if r >= warmup:
                samples[name].append(t)
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median seconds of each case."""
    return {name: statistics.median(ts) for name, ts in samples.items()}


def measure(
    cases: dict[str, Callable[[], object]], device: str, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per case, the cases interleaved round by round."""
    return medians(measure_rounds(cases, device, repeats, warmup))
