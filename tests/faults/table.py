"""Print the `make faults` results (tests/faults/conftest.py writes them) as one table.

    python -m tests.faults.table runs/faults/results.jsonl
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

COLUMNS = (("scenario", 30), ("expected", 44), ("observed", 60))


def table(rows: list[dict]) -> str:
    """The rows as a text table (cells wrapped), then each scenario's command."""
    rule = "+" + "+".join("-" * (w + 2) for _, w in COLUMNS) + "+"
    lines = [rule, "| " + " | ".join(n.ljust(w) for n, w in COLUMNS) + " |", rule]
    for row in rows:
        cells = [textwrap.wrap(str(row.get(n, "")), w) or [""] for n, w in COLUMNS]
        for i in range(max(len(c) for c in cells)):
            lines.append("| " + " | ".join((c[i] if i < len(c) else "").ljust(w)
                                           for c, (_, w) in zip(cells, COLUMNS)) + " |")
        lines.append(rule)
    lines += ["", "Commands:"] + [f"  {row['scenario']}: {row['command']}" for row in rows]
    return "\n".join(lines)


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/faults/results.jsonl")
    if not path.is_file():
        print(f"{path}: no results (run `make faults`)", file=sys.stderr)
        return 1
    print(table([json.loads(line) for line in path.read_text().splitlines() if line.strip()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
