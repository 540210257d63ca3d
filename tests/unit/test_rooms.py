"""The rooms of the README's Architecture section, enforced: who may import whom, no circles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("common", "server", "client", "launcher", "simulations")
MAY_IMPORT = {"common": {"common"}, "server": {"common", "server"},
              "client": {"common", "client"}, "launcher": {"common", "launcher"},
              "simulations": {"common", "launcher", "simulations"}}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_only_the_rooms_it_may(room):
    for path in sorted((ROOT / room).rglob("*.py")):
        for module in imports(path):
            top = module.split(".")[0]
            if top in ROOMS:
                assert top in MAY_IMPORT[room], f"{module_name(path)} imports {module}"
            if room == "common":
                assert top != "flwr", f"{module_name(path)} imports {module} (common is Flower-free)"


@pytest.mark.parametrize("room", ["common", "client", "server"])
def test_no_import_circle_inside_a_room(room):
    modules = {module_name(p): p for p in (ROOT / room).rglob("*.py")}
    edges = {name: {m for m in imports(path) if m in modules} for name, path in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges[start] - seen:
            if nxt == goal or reaches(nxt, goal, seen | {nxt}):
                return True
        return False
    circles = sorted(name for name in modules if reaches(name, name, set()))
    assert circles == [], f"import circle through {circles}"
