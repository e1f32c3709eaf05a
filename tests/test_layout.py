"""The package layout holds: documented import paths work, and imports only go down the layers.

docs/design.md draws the map; this module keeps the code and the documentation in step.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "django_eventbus"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOTTED = re.compile(r"\bdjango_eventbus(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
#: dotted names in the docs that are not import paths
NOT_PATHS = re.compile(
    r"django_eventbus\.[EW]\d{3}$"  # system check ids
    r"|django_eventbus\.relay$|django_eventbus\.streams$"  # the relays' cursor names
    r"|_storedevent$|_deadletter$"  # admin permission and URL names
)

#: package part -> the parts of django_eventbus it must not import (the layers above it)
FORBIDDEN = {
    "events": {"*"},  # framework-free: nothing else of the package, and no Django
    "capture": {"channels", "admin", "management"},
    "delivery": {"capture", "channels", "admin", "management"},
    "models": {"capture", "delivery", "channels", "admin", "management"},
    "conf": {"capture", "delivery", "channels", "admin", "management"},
}


def documented_paths() -> list[str]:
    found: set[str] = set()
    for path in DOCS:
        found.update(DOTTED.findall(path.read_text(encoding="utf-8")))
    return sorted(name for name in found if not NOT_PATHS.search(name))


def resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` and get the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return target
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("dotted", documented_paths())
def test_every_import_path_the_docs_name_works(dotted: str) -> None:
    assert resolve(dotted) is not None


def test_the_docs_name_the_paths_of_each_layer() -> None:
    paths = documented_paths()
    for layer in ("events", "capture", "delivery", "channels"):
        assert any(p.startswith(f"django_eventbus.{layer}") for p in paths), layer


def _imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports, relative imports resolved."""
    # The package a relative import starts from (for __init__.py: its own package).
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "django_eventbus" or len(parts) < 2:
        return None
    return parts[1]


def test_imports_only_go_down_the_layers() -> None:
    problems: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        forbidden = FORBIDDEN.get(own)
        if forbidden is None:
            continue
        for name in sorted(_imports(path)):
            part = _part(name)
            if own == "events" and (name == "django" or name.startswith("django.")):
                problems.append(f"{path.relative_to(ROOT)} imports {name} (events/ is framework-free)")
            if part is None or part == own:
                continue
            if "*" in forbidden or part in forbidden:
                problems.append(f"{path.relative_to(ROOT)} imports {name}")
    assert problems == []
