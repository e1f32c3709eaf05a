"""The event log admin in a real Chromium: log in, list, filter, search, open an event; live mode.

Screenshots go to ``artifacts/admin/`` at the repository root (kept by CI as test artifacts).
Run with ``DJANGO_ALLOW_ASYNC_UNSAFE=true python -m pytest -m browser tests/browser/test_admin_browser.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.contrib.auth.models import User
from django.db import connection

from django_eventbus.models import StoredEvent

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "admin"
PASSWORD = "correct horse battery staple"

try:
    from playwright.sync_api import Dialog, Page, expect
except ImportError:  # pragma: no cover - the dev extra installs it
    pytest.skip("playwright is not installed", allow_module_level=True)


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
def admin_user() -> User:
    return User.objects.create_superuser("boss", "boss@example.com", PASSWORD)


@pytest.fixture
def log() -> list[StoredEvent]:
    base = datetime.now(timezone.utc) - timedelta(minutes=5)
    rows = []
    for i in range(12):
        topic = ["inventory:product", "inventory:order", "billing:invoice"][i % 3]
        rows.append(
            StoredEvent.objects.create(
                event_id=str(uuid.uuid4()),
                type=["created", "updated", "deleted"][i % 3],
                topic=topic,
                payload={"pk": i, "name": f"item {i}", "note": "<script>alert('pwned')</script>"},
                timestamp=base + timedelta(seconds=i),
                source=f"web-{i % 2}:100{i % 2}",
                correlation_id=f"req-{i // 4}",
                metadata={"user": "alice"},
            )
        )
    return rows


def log_in(page: Page, base_url: str) -> None:
    page.goto(f"{base_url}/admin/login/?next=/admin/django_eventbus/storedevent/")
    page.fill("#id_username", "boss")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("#result_list")).to_be_visible()


def topics_shown(page: Page) -> list[str]:
    return page.locator("#result_list tbody td.field-topic").all_inner_texts()


def test_list_filter_search_and_detail(
    page: Page, live_server: Any, admin_user: User, log: list[StoredEvent]
) -> None:
    dialogs: list[str] = []

    def on_dialog(dialog: Dialog) -> None:  # an alert() would mean the payload's <script> ran
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)

    log_in(page, live_server.url)
    expect(page.locator("#result_list tbody tr")).to_have_count(12)
    assert (
        page.locator("#result_list tbody tr th.field-time a")
        .first.inner_text()
        .startswith(log[-1].timestamp.strftime("%Y-%m-%d %H:%M:%S."))
    )  # newest first
    expect(page.locator("#eventbus-live-toggle")).to_have_text("Follow live")
    expect(page.locator(".paginator")).to_contain_text("12 events")
    shot(page, "01-event-list")

    # Filter: type, then topic (the links of the filter sidebar).
    page.locator("#changelist-filter").get_by_role("link", name="Deleted").click()
    expect(page.locator("#result_list tbody tr")).to_have_count(4)
    assert set(page.locator("#result_list tbody td.field-type").all_inner_texts()) == {"Deleted"}
    page.locator("#changelist-filter").get_by_role("link", name="billing:invoice").click()
    expect(page.locator("#result_list tbody tr")).to_have_count(4)
    assert set(topics_shown(page)) == {"billing:invoice"}
    shot(page, "02-filtered")

    # Search: a correlation id, then an event id, then a topic prefix.
    page.goto(f"{live_server.url}/admin/django_eventbus/storedevent/")
    page.fill("#searchbar", "req-1")
    page.press("#searchbar", "Enter")
    expect(page.locator("#result_list tbody tr")).to_have_count(4)
    expect(page.locator("#changelist-search")).to_contain_text("4 results")
    shot(page, "03-search-correlation")
    page.fill("#searchbar", log[5].event_id)
    page.press("#searchbar", "Enter")
    expect(page.locator("#result_list tbody tr")).to_have_count(1)
    page.fill("#searchbar", "inventory:")
    page.press("#searchbar", "Enter")
    expect(page.locator("#result_list tbody tr")).to_have_count(8)

    # Open one event: pretty, escaped JSON; read-only.
    page.locator("#result_list tbody tr th.field-time a").first.click()
    expect(page.locator("pre.eventbus-json").first).to_contain_text(
        '"note": "<script>alert(\'pwned\')</script>"'
    )
    assert '\n  "pk": ' in page.locator("pre.eventbus-json").first.inner_text()  # indented
    expect(page.locator("input[name=_save]")).to_have_count(0)
    expect(page.locator("text=events of this correlation")).to_be_visible()
    shot(page, "04-event-detail")
    assert dialogs == []  # the payload's <script> never ran

    page.locator("text=events of this correlation").click()
    expect(page.locator("#result_list tbody tr")).to_have_count(4)


# -- live mode: a real daphne serving the websocket consumer -------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def database_url() -> str:
    """The test database, as DATABASE_URL for a server in another process."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    user = quote(settings["USER"] or "")
    password = f":{quote(settings['PASSWORD'])}" if settings["PASSWORD"] else ""
    host, port = settings["HOST"] or "127.0.0.1", settings["PORT"] or 5432
    return f"postgres://{user}{password}@{host}:{port}/{settings['NAME']}"


@pytest.fixture
def daphne_url(transactional_db: None) -> Iterator[str]:
    """testproject.asgi under daphne, memory bus and in-memory channel layer: one process does it all."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "EVENTBUS_URL": "memory://",
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "DJANGO_DEBUG": "1",  # static files (admin-live.js) served by the ASGI app
    }
    env.pop("CHANNEL_LAYER_URL", None)
    log_path = ARTIFACTS / "daphne.log"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "testproject.asgi:application",
            ],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"daphne did not start; see {log_path}") from None
                    time.sleep(0.1)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()


def test_follow_live(page: Page, daphne_url: str, admin_user: User, log: list[StoredEvent]) -> None:
    from django_eventbus.channels import CONSUMER_NAME
    from django_eventbus.delivery.consumers import get_consumers

    if CONSUMER_NAME not in {c.name for c in get_consumers()}:
        pytest.skip(
            "the Channels forwarder is not registered: apps.ready() does not call channels.setup() yet"
        )

    dialogs: list[str] = []

    def on_dialog(dialog: Dialog) -> None:  # an alert() would mean markup in a payload ran
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    log_in(page, daphne_url)
    page.evaluate("localStorage.clear()")
    page.click("#eventbus-live-toggle")
    expect(page.locator("#eventbus-live-status")).to_have_text("following new events", timeout=10_000)
    expect(page.locator("#eventbus-live-toggle")).to_have_text("Stop following")

    # Another tab of the same user changes a tracked model: its event appears in the list.
    other = page.context.new_page()
    other.goto(f"{daphne_url}/admin/inventory/product/add/")
    other.fill("#id_name", "Live <b>widget</b><script>alert(1)</script><img src=x onerror=alert(2)>")
    other.fill("#id_price", "9.99")
    other.fill("#id_stock", "2")
    other.click("input[name=_save]")
    expect(other.locator(".messagelist")).to_contain_text("was added successfully")

    row = page.locator("#result_list tbody tr.eventbus-live-row").first
    expect(row).to_be_visible(timeout=10_000)
    expect(row.locator("td.field-topic")).to_have_text("inventory:product")
    expect(row.locator("td.field-type")).to_have_text("Created")
    expect(row.locator("td.field-short_payload")).to_contain_text('"name": "Live <b>')  # as text,
    expect(row.locator("td.field-short_payload b")).to_have_count(0)  # not as HTML
    expect(row.locator("td.field-short_payload img, td.field-short_payload script")).to_have_count(0)
    expect(page.locator("#result_list tbody tr")).to_have_count(13)
    shot(page, "05-follow-live")

    # The row links to the event's detail page (by event id: live rows have no log id).
    row.locator("th.field-time a").click()
    expect(page.locator("pre.eventbus-json").first).to_contain_text("Live <b>widget</b><script>alert(1)")
    assert dialogs == []  # neither the live row nor the detail page ran the payload's markup

    # Switched off, it stays off after a reload.
    page.go_back()
    page.click("#eventbus-live-toggle")
    page.reload()
    expect(page.locator("#eventbus-live-toggle")).to_have_text("Follow live")
