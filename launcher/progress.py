"""A progress bar over Flower's streamed log: rounds, the current round's sites, ETA.

`Display.write(line)` receives every line `flwr run --stream` prints. On a terminal, the
ServerApp's `[fedmm] progress round R/N train k/m` lines (server/progress.py) update one bar at
the bottom,

    [fedmm] ████████░░░░░░░░░░░░ round 3/5 | sites 4/10 | 1m12s | ETA 0m48s

and every other line is printed above it. Anywhere else (a pipe, a file, CI) every line is
passed on unchanged: the per-round `[fedmm] round ...` lines and the progress lines are the plain
record.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from typing import TextIO

PROGRESS = re.compile(r"\[fedmm\] progress round (\d+)/(\d+) (\w+) (\d+)/(\d+)")
ROUND = re.compile(r"\[fedmm\] round\s+(\d+)/(\d+) \|")
WIDTH = 20


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class Display:
    """Render a run's streamed log: a bar on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None,
                 now=time.monotonic):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.now = now
        self.rounds = 0              # rounds of the run
        self.done = 0                # rounds complete (evaluated)
        self.current = 0             # the round whose sites are training
        self.sites = (0, 0)          # replies in / messages sent, this round
        self.started = None          # when the first round began
        self.first = 0               # the first round this process saw start (resume)
        self.shown = False

    def write(self, line: str) -> None:
        """Take one line of the log (with or without its newline)."""
        self._update(line)
        if not self.tty:
            self.stream.write(line if line.endswith("\n") else line + "\n")
            self.stream.flush()
            return
        if not PROGRESS.search(line):
            self._clear()
            self.stream.write(line if line.endswith("\n") else line + "\n")
        self._draw()

    def close(self) -> None:
        """Leave the bar's last state on its own line."""
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False

    def _update(self, line: str) -> None:
        progress, finished = PROGRESS.search(line), ROUND.search(line)
        if progress:
            server_round, rounds, kind, got, total = progress.groups()
            if kind != "train":
                return
            self.rounds = int(rounds)
            self.current, self.sites = int(server_round), (int(got), int(total))
            if self.started is None:
                self.started, self.first = self.now(), self.current
        elif finished:
            self.done, self.rounds = int(finished[1]), int(finished[2])
            if self.done == self.current:
                self.sites = (self.sites[1], self.sites[1])

    def eta(self) -> float | None:
        """Seconds left: the time per round so far times the rounds (and sites) left."""
        if self.started is None or not self.rounds:
            return None
        in_round = self.sites[0] / self.sites[1] if self.sites[1] else 0.0
        progress = (self.done - self.first + 1) if self.done >= self.current else \
            (self.current - self.first) + in_round
        if progress <= 0:
            return None
        elapsed = self.now() - self.started
        return elapsed / progress * (self.rounds - self.first + 1 - progress)

    def bar(self) -> str:
        """The bar's text (no newline)."""
        share = (self.done + (self.sites[0] / self.sites[1] if self.sites[1] and
                              self.done < self.current else 0.0)) / max(self.rounds, 1)
        filled = round(WIDTH * min(share, 1.0))
        elapsed = self.now() - self.started if self.started is not None else 0.0
        eta = self.eta()
        return (f"[fedmm] {'█' * filled}{'░' * (WIDTH - filled)} round {self.current}/"
                f"{self.rounds} | sites {self.sites[0]}/{self.sites[1]} | {clock(elapsed)} | "
                f"ETA {'-' if eta is None else clock(eta)}")

    def _clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.shown = False

    def _draw(self) -> None:
        if self.started is None:
            self.stream.flush()
            return
        columns = shutil.get_terminal_size((100, 20)).columns
        self.stream.write("\r\x1b[K" + self.bar()[:columns - 1])
        self.stream.flush()
        self.shown = True
