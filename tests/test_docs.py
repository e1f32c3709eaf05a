"""Every Python block of the README and docs/ runs here, as written.

Settings blocks (those that assign ``EVENTBUS``) must also pass the system
checks. Blocks define models in an isolated app registry, and whatever they
register (consumers, tracked models) is removed afterwards.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test.utils import isolate_apps, override_settings

from django_eventbus.capture import tracking
from django_eventbus.checks import check_settings
from django_eventbus.delivery import consumers

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


def snippets() -> Iterator[Any]:
    for path in FILES:
        for index, match in enumerate(BLOCK.finditer(path.read_text())):
            code = textwrap.dedent(match.group(2))  # blocks inside list items are indented
            yield pytest.param(path, code, id=f"{path.relative_to(ROOT)}#{index + 1}")


def test_docs_have_python_snippets() -> None:
    assert len(list(snippets())) >= 15


@pytest.fixture
def inventory_alias() -> Iterator[None]:
    # Docs say "from inventory.models import Product", as a user's project would.
    import testproject.inventory
    import testproject.inventory.models

    saved = {name: sys.modules.get(name) for name in ("inventory", "inventory.models")}
    sys.modules["inventory"] = testproject.inventory
    sys.modules["inventory.models"] = testproject.inventory.models
    yield
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path, code", list(snippets()))
def test_snippet_runs(path: Path, code: str, settings: Any, inventory_alias: None) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "BUS": "memory://"}
    registered = dict(consumers._registry)
    decorated = dict(tracking._decorated)
    namespace: dict[str, Any] = {"__name__": "docs_snippet"}
    try:
        with isolate_apps("testproject.inventory"), contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, str(path), "exec"), namespace)
    finally:
        consumers._registry.clear()
        consumers._registry.update(registered)
        tracking._decorated.clear()
        tracking._decorated.update(decorated)
        tracking.connect_signals()
    if "EVENTBUS" in namespace:
        with override_settings(EVENTBUS=namespace["EVENTBUS"]):
            errors = check_settings()
        if connection.vendor != "postgresql":  # "postgres://" needs Django's DB to be PostgreSQL
            errors = [e for e in errors if e.id != "django_eventbus.E005"]
        assert errors == [], f"settings snippet of {path.name} fails the checks: {errors}"
