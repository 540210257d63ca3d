"""Every config override the docs and scripts give still composes (a renamed key fails here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from common.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
# Where a command takes Hydra overrides: file -> the text that precedes them on a line.
SOURCES = {
    "README.md": r"python -m simulations\.run|fedmm train|make run ARGS=\"?",
    "Makefile": r"DP_CENTRAL \?=|DP_LOCAL +\?=",
    "docker/e2e.sh": r"run --rm -T train",
}


def documented_overrides() -> list[tuple[str, list[str]]]:
    """(where, overrides) for each documented command; a sweep's `a,b` or `[a],[b,c]` keeps its
    first value."""
    found = []
    for name, lead in SOURCES.items():
        text = (ROOT / name).read_text().replace("\\\n", " ")
        for line in text.splitlines():
            match = re.search(rf"(?:{lead})\s*(.*)", line)
            if not match:
                continue
            try:
                tokens = shlex.split(match[1].split(" #")[0].split("|")[0].replace("`", " "))
            except ValueError:  # an unbalanced quote in prose
                continue
            overrides = [re.sub(r"=(\[[^\]]*\]),\[.*$", r"=\1",  # a sweep of lists: the first
                                re.sub(r"=([^\[\],]+),[^\[\]]*$", r"=\1", t)) for t in tokens
                         if re.fullmatch(r"[a-z_][\w.]*=\S*", t) and not re.search(r"[$<]|\.\.\.", t)]
            if overrides:
                found.append((f"{name}: {' '.join(overrides)}", overrides))
    return found


COMMANDS = documented_overrides()


def test_the_docs_hold_the_commands_this_test_reads():
    assert len(COMMANDS) >= 12 and {c.split(":")[0] for c, _ in COMMANDS} == set(SOURCES)


@pytest.mark.parametrize("overrides", [o for _, o in COMMANDS], ids=[c for c, _ in COMMANDS])
def test_documented_overrides_compose(overrides):
    try:
        load_config(overrides)
    except ConfigError as err:  # a placeholder path (/d/train.csv) is the reader's to fill in
        if "must be an existing file" not in str(err):
            raise
