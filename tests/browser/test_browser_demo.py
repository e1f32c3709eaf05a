"""The demo page in a real Chromium: the live feed, login gating, and reconnect without loss.

Run with ``DJANGO_ALLOW_ASYNC_UNSAFE=true python -m pytest -m browser`` (see conftest).
Screenshots are saved to ``artifacts/``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from testproject.inventory.models import Product
from tests.services import require_redis
from tests.websocket_support import REPO, Server, Stack, make_user, session_cookie, stack_env, wait_for_port

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

ARTIFACTS = REPO / "artifacts"


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_timeout(600)  # let the feed's entry animation finish
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture(autouse=True)
def _allow_orm_next_to_playwright() -> None:
    if os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE") != "true":
        pytest.fail(
            "run the browser tests with DJANGO_ALLOW_ASYNC_UNSAFE=true (Playwright's loop is in this thread)"
        )


@pytest.fixture
def demo_server(transactional_db: Any) -> Iterator[str]:
    """The demo as `scripts/demo` runs it: memory bus, in-memory channel layer, one daphne process."""
    stack = Stack(stack_env(bus_url=None))
    try:
        server, port = stack.daphne()
        wait_for_port(port, server)
        yield f"http://127.0.0.1:{port}"
    finally:
        stack.stop()


def log_in(page: Page, base: str, username: str, password: str) -> None:
    page.goto(f"{base}/admin/login/?next=/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    expect(page).to_have_url(f"{base}/")


def test_a_product_saved_in_the_admin_appears_in_the_feed(demo_server: str, context: BrowserContext) -> None:
    base = demo_server
    make_user("admin", superuser=True, password="admin")
    feed_page = context.new_page()
    log_in(feed_page, base, "admin", "admin")
    expect(feed_page.locator("#status")).to_have_text("live", timeout=10_000)

    # Another tab: the admin's add form (the request is handled by the same server).
    admin_page = context.new_page()
    admin_page.goto(f"{base}/admin/inventory/product/add/")
    admin_page.fill("#id_name", "Chromium desk lamp")
    admin_page.fill("#id_price", "24.50")
    admin_page.fill("#id_stock", "7")
    admin_page.click("input[name=_save]")
    expect(admin_page.locator(".messagelist")).to_contain_text("was added successfully")

    item = feed_page.locator("#feed li", has_text="Chromium desk lamp")
    expect(item).to_have_count(1, timeout=5_000)
    expect(item.locator(".type")).to_have_text("created")
    expect(feed_page.locator("#products tr", has_text="Chromium desk lamp")).to_contain_text("24.50")

    # An update shows what changed.
    admin_page.goto(f"{base}/admin/inventory/product/")
    admin_page.click("text=Chromium desk lamp")
    admin_page.fill("#id_stock", "3")
    admin_page.click("input[name=_save]")
    updated = feed_page.locator("#feed li", has_text="stock: 7 → 3")
    expect(updated).to_have_count(1, timeout=5_000)
    expect(feed_page.locator("#products tr", has_text="Chromium desk lamp").locator(".stock")).to_have_text(
        "3"
    )
    feed_page.bring_to_front()
    screenshot(feed_page, "browser-demo-feed.png")


def test_the_form_on_the_page_adds_a_product_live(demo_server: str, page: Page) -> None:
    make_user("admin", superuser=True, password="admin")
    log_in(page, demo_server, "admin", "admin")
    expect(page.locator("#status")).to_have_text("live", timeout=10_000)
    page.fill("form.add input[name=name]", "Form lamp")
    page.click("form.add button")
    expect(page).to_have_url(demo_server + "/")  # posted, redirected back
    expect(page.locator("#products tr", has_text="Form lamp")).to_have_count(1)
    assert Product.objects.filter(name="Form lamp").count() == 1


def test_the_home_page_loads_without_console_errors_or_failed_requests(demo_server: str, page: Page) -> None:
    make_user("admin", superuser=True, password="admin")
    log_in(page, demo_server, "admin", "admin")
    # A fresh context (empty cache) holding the session: Django's login page is not ours.
    browser = page.context.browser
    assert browser is not None
    fresh = browser.new_context()
    try:
        # The stubs type cookies() and add_cookies() with two TypedDicts; the one is the other's input.
        fresh.add_cookies(page.context.cookies())  # type: ignore[arg-type]
        home = fresh.new_page()
        errors: list[str] = []
        home.on(
            "console", lambda m: errors.append(f"{m.text} at {m.location}") if m.type == "error" else None
        )
        home.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
        home.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        home.on("requestfailed", lambda r: errors.append(f"failed {r.url}"))
        home.goto(demo_server + "/")
        expect(home.locator("#status")).to_have_text("live", timeout=10_000)
        home.wait_for_load_state("networkidle")  # the favicon is asked for after "load"
        assert errors == []
    finally:
        fresh.close()


def test_anonymous_visitors_are_asked_to_log_in(demo_server: str, page: Page) -> None:
    Product.objects.create(name="Visible lamp", stock=1)
    page.goto(demo_server + "/")
    expect(page.locator("#products")).to_contain_text("Visible lamp")  # the list is public here
    notice = page.locator("#login-needed")
    expect(notice).to_contain_text("log in")
    expect(notice.locator("a")).to_have_attribute("href", "/admin/login/?next=/")
    expect(page.locator("#status")).to_have_text("offline")  # no socket opened
    screenshot(page, "browser-demo-anonymous.png")


@pytest.mark.redis
def test_the_client_reconnects_and_misses_nothing(
    transactional_db: Any, use_bus: Any, context: BrowserContext
) -> None:
    """The server goes away; events happen; it comes back: the page shows every event once."""
    url = require_redis()
    bus = use_bus("redis")["BUS"]  # this process publishes on the servers' bus
    stack = Stack(stack_env(bus_url=url, bus_prefix=bus["channel_prefix"], layer_url=url))
    try:
        listener = stack.listener()
        server, port = stack.daphne()
        wait_for_port(port, server)
        listener.wait_for_output("listening on")
        base = f"http://127.0.0.1:{port}"
        admin = make_user("admin", superuser=True)
        context.add_cookies([{"name": "sessionid", "value": session_cookie(admin), "url": base}])
        page = context.new_page()
        page.goto(base + "/")
        status = page.locator("#status")
        expect(status).to_have_text("live", timeout=10_000)
        Product.objects.create(name="Before", stock=1)
        expect(page.locator("#feed li", has_text="Before")).to_have_count(1, timeout=5_000)

        # The server dies (as in a deploy); the page notices.
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(5)
        expect(status).not_to_have_text("live", timeout=5_000)  # "reconnecting…"/"connecting…"
        missed = [Product.objects.create(name=f"Missed {i}", stock=i) for i in range(3)]
        Product.objects.filter(pk=missed[0].pk).update(stock=42)

        # It comes back on the same port: the page resubscribes with `since`.
        restarted = Server(f"daphne-{port}-again", server.process.args, stack.env)  # type: ignore[arg-type]
        stack.servers.append(restarted)
        wait_for_port(port, restarted)
        expect(status).to_have_text("live", timeout=15_000)
        for product in missed:
            expect(page.locator("#feed li", has_text=f"{product.name} (#{product.pk})")).to_have_count(
                1 if product is not missed[0] else 2, timeout=5_000
            )
        expect(page.locator("#feed li", has_text="stock: 0 → 42")).to_have_count(1)
        Product.objects.create(name="After", stock=1)
        expect(page.locator("#feed li", has_text="After")).to_have_count(1, timeout=5_000)
        # Every event once: 1 before + 3 created + 1 updated while down + 1 after.
        ids = page.locator("#feed li[data-event-id]").evaluate_all(
            "items => items.map(i => i.dataset.eventId)"
        )
        assert len(ids) == 6 == len(set(ids))
        expect(page.locator("#feed li", has_text="Before")).to_have_count(1)
        screenshot(page, "browser-demo-reconnected.png")
    finally:
        stack.stop()
