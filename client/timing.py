"""When the work on a train message started, for its `site-startup-s` train metric.

Start-up runs from there to the first training step: for a deployed site, from the start of
the `flwr-clientapp` process Flower launched for the message (imports, app install, backbone,
data, cached stems); in simulation, from the handler's call (the worker process is long-lived).
`train-seconds` then counts the training itself.

Torch-free: the warm-trainer relay (client/warm.py) imports it in the `flwr-clientapp` process.
"""

from __future__ import annotations

import os
import sys
import time

import psutil

_RELAYED: list[float] = []  # a warm trainer's message: when its flwr-clientapp process started


def clientapp_started() -> float | None:
    """When this process started, if it is a `flwr-clientapp` (one process per message)."""
    if os.path.basename(sys.argv[0]) != "flwr-clientapp":
        return None
    return psutil.Process().create_time()


def message_started() -> float:
    """When the work on the current message started (wall clock, seconds since the epoch)."""
    if _RELAYED:
        return _RELAYED[-1]
    started = clientapp_started()
    return time.time() if started is None else started


class relayed:
    """Within this block, the message being handled started at `started` in another process."""

    def __init__(self, started: float):
        self.started = started

    def __enter__(self) -> None:
        _RELAYED.append(self.started)

    def __exit__(self, *exc: object) -> None:
        _RELAYED.pop()

