"""What every benchmark shares: one JSON line per figure, and repeated timing."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable


def emit(**fields: object) -> None:
    """Print one figure as a JSON line."""
    print(json.dumps(fields), flush=True)


def timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Return the median and min seconds of `reps` calls of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)
