"""Progress: the ServerApp's per-reply lines, and the launcher's bar (terminal) or plain lines."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from common import keys
from launcher.progress import Display, clock
from server.progress import ProgressGrid, progress_line

ROUND0 = "[fedmm] round   0/5 | clients 0/0 (rejected 0) | train loss    -   | test acc 0.1\n"


def _round(r: int) -> str:
    return f"[fedmm] round   {r}/5 | clients 10/10 (rejected 0) | train loss 1.0 | test acc 0.5\n"


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_off_a_terminal_every_line_passes_unchanged():
    out = io.StringIO()
    display = Display(out, tty=False)
    lines = [ROUND0, progress_line(1, 5, "train", 3, 10), "INFO : something\n", _round(1)]
    for line in lines:
        display.write(line)
    display.close()
    assert out.getvalue() == "".join(line if line.endswith("\n") else line + "\n"
                                     for line in lines)


def test_on_a_terminal_progress_lines_become_one_bar_with_an_eta():
    out, now = io.StringIO(), Clock()
    display = Display(out, tty=True, now=now)
    display.write(ROUND0)
    display.write(progress_line(1, 5, "train", 0, 10) + "\n")
    now.t = 10.0
    display.write(progress_line(1, 5, "train", 10, 10) + "\n")
    display.write(_round(1))
    display.write(progress_line(2, 5, "train", 0, 10) + "\n")
    now.t = 15.0
    display.write(progress_line(2, 5, "train", 5, 10) + "\n")
    # 1.5 rounds' worth in 15 s: 3.5 rounds left take 35 s
    assert display.eta() == pytest.approx(35.0)
    assert display.bar().endswith("round 2/5 | sites 5/10 | 0m15s | ETA 0m35s")
    display.write("INFO : a log line\n")
    display.close()
    text = out.getvalue()
    assert "[fedmm] progress" not in text  # rendered, not printed
    assert text.count("INFO : a log line\n") == 1 and text.count(_round(1)) == 1
    assert "\r\x1b[K[fedmm] " in text and text.endswith("\n")
    assert "██████" in display.bar()  # 1.5 of 5 rounds: 6 of 20 cells


def test_eta_counts_only_the_rounds_this_run_does_after_a_resume():
    now = Clock()
    display = Display(io.StringIO(), tty=True, now=now)
    display.write(progress_line(4, 5, "train", 0, 10))  # resumed after round 3
    now.t = 20.0
    display.write(_round(4))
    assert display.eta() == pytest.approx(20.0)  # one round in 20 s, one left
    assert clock(3725) == "1h02m" and clock(75) == "1m15s"


class FakeGrid:
    """Replies come in over several pulls; the grid interface Flower's strategies use."""

    def __init__(self, batches: list[int]):
        self.batches, self.pushed = list(batches), []

    def push_messages(self, messages):
        self.pushed = [f"id{i}" for i, _ in enumerate(messages)]
        return list(self.pushed)

    def pull_messages(self, message_ids):
        take = self.batches.pop(0) if self.batches else 0
        ids = [i for i in self.pushed if i in set(message_ids)][:take]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids]

    def get_node_ids(self):
        return [1, 2, 3]


@pytest.mark.usefixtures("flower_task_identity")
def test_progress_grid_prints_a_line_per_pull_that_brought_replies(capsys):
    grid = ProgressGrid(FakeGrid([1, 0, 2]), rounds=5, poll_s=0.001)
    messages = [Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 3})}),
                        dst_node_id=n, message_type="train") for n in (1, 2, 3)]
    replies = grid.send_and_receive(messages, timeout=30)
    assert len(list(replies)) == 3
    assert capsys.readouterr().out.splitlines() == [
        "[fedmm] progress round 3/5 train 0/3", "[fedmm] progress round 3/5 train 1/3",
        "[fedmm] progress round 3/5 train 3/3"]
    assert grid.get_node_ids() == [1, 2, 3] and grid.send_and_receive([]) == []


@pytest.mark.usefixtures("flower_task_identity")
def test_progress_grid_gives_up_at_the_timeout_with_what_came():
    grid = ProgressGrid(FakeGrid([1]), rounds=1, poll_s=0.01)
    messages = [Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}),
                        dst_node_id=n, message_type="train") for n in (1, 2)]
    assert len(list(grid.send_and_receive(messages, timeout=0.2))) == 1
