"""Progress of the current round: one line each time more sites have replied.

`ProgressGrid` is Flower's Grid with `send_and_receive` done the way Flower's own grids do it
(push, then pull until every reply is in or the timeout passes), printing after each pull that
brought replies:

    [fedmm] progress round 3/5 train 4/10

The launcher (launcher/progress.py) turns these lines and the per-round `[fedmm] round ...`
lines into a progress bar on a terminal, and passes them on as plain lines otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from common import keys

PREFIX = "[fedmm] progress"


def progress_line(server_round: int, rounds: int, kind: str, done: int, total: int) -> str:
    return f"{PREFIX} round {server_round}/{rounds} {kind} {done}/{total}"


class ProgressGrid(Grid):
    """Delegate to `grid`; report the replies of each send_and_receive as they arrive."""

    def __init__(self, grid: Grid, rounds: int, poll_s: float | None = None):
        self.grid, self.rounds = grid, rounds
        self.poll_s = poll_s or min(1.0, getattr(grid, "pull_interval", 1.0))  # Flower's: 0.1-3 s

    def __getattr__(self, name: str):  # everything else is Flower's grid
        return getattr(self.grid, name)

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        first = messages[0]
        kind = first.metadata.message_type
        server_round = int(first.content.config_records.get(keys.CONFIG, {}).get(
            keys.SERVER_ROUND, 0)) if first.has_content() else 0
        pending = set(self.grid.push_messages(messages))
        total = len(pending)
        print(progress_line(server_round, self.rounds, kind, 0, total), flush=True)
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.grid.pull_messages(pending))
            if got:
                replies.extend(got)
                pending.difference_update(m.metadata.reply_to_message_id for m in got)
                print(progress_line(server_round, self.rounds, kind, total - len(pending), total),
                      flush=True)
            if not pending:
                break
            time.sleep(self.poll_s)
        return replies
