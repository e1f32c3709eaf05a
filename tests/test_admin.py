"""The event log admin: read-only, filters and search on indexes, no full COUNT(*), re-publish."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from django_eventbus.admin import EventLogPaginator, pretty_json, short_json
from django_eventbus.models import ConsumerCursor, DeadLetter, StoredEvent
from django_eventbus.testing import capture_events

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:django_eventbus_storedevent_changelist")


def change_url(obj: StoredEvent | str | int) -> str:
    key = obj.pk if isinstance(obj, StoredEvent) else obj
    return reverse("admin:django_eventbus_storedevent_change", args=[key])


def make_row(topic: str = "inventory:product", type: str = "created", **kw: Any) -> StoredEvent:
    defaults: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "payload": {"pk": 1},
        "timestamp": datetime.now(timezone.utc),
        "source": "web-1:100",
        "correlation_id": None,
        "metadata": {},
    }
    defaults.update(kw)
    return StoredEvent.objects.create(topic=topic, type=type, **defaults)


def rows_shown(response: Any) -> list[str]:
    """The event ids of the rows of a changelist page, in order (from their payloads)."""
    return re.findall(r"&quot;mark&quot;: &quot;([^&]+)&quot;", response.content.decode())


@pytest.fixture
def events() -> list[StoredEvent]:
    """A small log: three topics, two sources, every row marked in its payload."""
    base = datetime.now(timezone.utc) - timedelta(minutes=10)
    specs = [
        ("inventory:product", "created", "web-1:100"),
        ("inventory:product", "updated", "web-1:100"),
        ("inventory:order", "created", "web-2:200"),
        ("billing:invoice", "custom", "worker:300"),
        ("inventory:product", "deleted", "web-2:200"),
    ]
    return [
        make_row(
            topic, type_, source=source, payload={"mark": f"m{i}"}, timestamp=base + timedelta(seconds=i)
        )
        for i, (topic, type_, source) in enumerate(specs)
    ]


def filter_named(response: Any, parameter: str) -> Any:
    return next(
        f for f in response.context["cl"].filter_specs if getattr(f, "parameter_name", "") == parameter
    )


def staff(*perms: str) -> User:
    user = User.objects.create_user(f"staff-{uuid.uuid4().hex[:6]}", password="pw", is_staff=True)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return User.objects.get(pk=user.pk)  # fresh instance: no stale permission cache


def client_for(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


# -- the list -------------------------------------------------------------------------------


def test_changelist_is_newest_first_with_the_columns(admin_client: Client, events: list[StoredEvent]) -> None:
    response = admin_client.get(CHANGELIST)
    assert response.status_code == 200
    assert rows_shown(response) == ["m4", "m3", "m2", "m1", "m0"]
    html = response.content.decode()
    for column in ("column-time", "column-type", "column-topic", "column-source", "column-short_payload"):
        assert column in html
    # Time with milliseconds, linking to the detail page.
    stamp = events[0].timestamp.strftime("%Y-%m-%d %H:%M:%S.")
    assert f'<a href="{change_url(events[0])}">{stamp}' in html
    assert "5 events" in html


def test_no_column_is_sortable(admin_client: Client, events: list[StoredEvent]) -> None:
    # Sorting 1M rows by topic would be a full sort: the list is always newest first.
    response = admin_client.get(CHANGELIST)
    assert "sortable" not in response.content.decode()
    assert rows_shown(admin_client.get(CHANGELIST + "?o=3")) == ["m4", "m3", "m2", "m1", "m0"]


def test_short_payload_is_one_escaped_line() -> None:
    assert short_json({"a": 1, "b": "é"}) == '{"a": 1, "b": "é"}'
    long = short_json({"text": "x" * 200})
    assert len(long) == 80 and long.endswith("…")


def test_payload_with_html_is_escaped_in_the_list(admin_client: Client) -> None:
    make_row(payload={"name": "<script>alert(1)</script>"})
    html = admin_client.get(CHANGELIST).content.decode()
    assert "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


@pytest.mark.parametrize(
    "query, expected",
    [
        ("type__exact=created", ["m2", "m0"]),
        ("topic=inventory:product", ["m4", "m1", "m0"]),
        ("source=web-2:200", ["m4", "m2"]),
        ("topic=inventory:product&type__exact=deleted", ["m4"]),
        ("topic=never:seen", []),
    ],
)
def test_filters(admin_client: Client, events: list[StoredEvent], query: str, expected: list[str]) -> None:
    response = admin_client.get(f"{CHANGELIST}?{query}")
    assert response.status_code == 200
    assert rows_shown(response) == expected


def test_date_filter(admin_client: Client, events: list[StoredEvent]) -> None:
    make_row(payload={"mark": "old"}, timestamp=datetime.now(timezone.utc) - timedelta(days=40))
    html = admin_client.get(CHANGELIST).content.decode()
    assert "Past 7 days" in html and "Today" in html  # a date list, not a date hierarchy
    # Follow the filter's own link (aware datetimes in its query string).
    [query] = re.findall(r'<a href="\?([^"]+)">Past 7 days</a>', html)
    response = admin_client.get(f"{CHANGELIST}?{query.replace('&amp;', '&')}")
    assert response.status_code == 200
    assert "old" not in rows_shown(response) and len(rows_shown(response)) == 5
    assert "old" in rows_shown(admin_client.get(CHANGELIST))


def test_topic_filter_offers_the_most_frequent_recent_topics(
    admin_client: Client, events: list[StoredEvent]
) -> None:
    response = admin_client.get(CHANGELIST)
    topic_filter = filter_named(response, "topic")
    # inventory:product (3) first, then the others by name.
    assert [value for value, _ in topic_filter.lookup_choices] == [
        "inventory:product",
        "billing:invoice",
        "inventory:order",
    ]
    source_filter = filter_named(response, "source")
    assert [value for value, _ in source_filter.lookup_choices] == ["web-1:100", "web-2:200", "worker:300"]


def test_top_values_only_read_the_recent_window(
    admin_client: Client, events: list[StoredEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    from django_eventbus.admin import StoredEventAdmin

    monkeypatch.setattr(StoredEventAdmin, "top_values_window", 2)
    monkeypatch.setattr(StoredEventAdmin, "top_values_limit", 1)
    response = admin_client.get(CHANGELIST + "?topic=inventory:order")
    topic_filter = filter_named(response, "topic")
    # The 2 newest rows are inventory:product and billing:invoice: the limit keeps the first by
    # count then name; the selected topic is added so the filter still shows it as selected.
    assert [value for value, _ in topic_filter.lookup_choices] == ["billing:invoice", "inventory:order"]
    assert rows_shown(response) == ["m2"]


def test_search_by_event_id_correlation_id_and_topic(admin_client: Client, events: list[StoredEvent]) -> None:
    correlated = make_row(topic="billing:refund", correlation_id="req-42", payload={"mark": "c1"})
    make_row(topic="billing:refund", correlation_id="req-42", payload={"mark": "c2"})

    def search(term: str) -> list[str]:
        response = admin_client.get(CHANGELIST, {"q": term})
        assert response.status_code == 200
        return rows_shown(response)

    assert search(events[2].event_id) == ["m2"]
    assert search(f"  {events[2].event_id} ") == ["m2"]  # pasted with spaces
    assert search("req-42") == ["c2", "c1"]
    assert search("inventory:") == ["m4", "m2", "m1", "m0"]  # topic prefix
    assert search("billing:invoice") == ["m3"]
    assert search("product") == []  # not a substring search (that would scan the whole log)
    assert search(correlated.event_id.upper()) == []  # ids are exact
    assert search("") == ["c2", "c1", "m4", "m3", "m2", "m1", "m0"]


def test_search_query_uses_plain_equality_and_prefix(admin_client: Client, events: list[StoredEvent]) -> None:
    with CaptureQueriesContext(connection) as queries:
        admin_client.get(CHANGELIST, {"q": "abc"})
    sql = " ".join(q["sql"] for q in queries.captured_queries if "django_eventbus_event" in q["sql"])
    # UPPER()/icontains would defeat every index.
    assert "UPPER" not in sql
    assert "LIKE '%abc%'" not in sql and "%%abc%%" not in sql


def test_no_full_count_of_the_log(admin_client: Client, events: list[StoredEvent]) -> None:
    with CaptureQueriesContext(connection) as queries:
        for query in ("", "?type__exact=created", "?q=inventory:", "?topic=inventory:product"):
            assert admin_client.get(CHANGELIST + query).status_code == 200
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts, "expected the capped counts"
    for sql in counts:
        # Every count is over a LIMITed subquery, never COUNT(*) of the whole table.
        assert "LIMIT" in sql.upper(), sql


# -- counts past the limit --------------------------------------------------------------------


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(EventLogPaginator, "count_limit", 3)
    yield


def test_filtered_count_past_the_limit_says_more_than(
    admin_client: Client, events: list[StoredEvent], small_limit: None
) -> None:
    for i in range(3):
        make_row(topic="inventory:product", payload={"mark": f"x{i}"})
    html = admin_client.get(CHANGELIST + "?topic=inventory:product").content.decode()
    assert "more than 3 events" in html
    html = admin_client.get(CHANGELIST, {"q": "inventory:product"}).content.decode()
    assert "more than 3 results" in html


def test_unfiltered_count_past_the_limit(
    admin_client: Client, events: list[StoredEvent], small_limit: None
) -> None:
    html = admin_client.get(CHANGELIST).content.decode()
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE django_eventbus_event")  # what autovacuum does on a real table
        html = admin_client.get(CHANGELIST).content.decode()
        assert re.search(r"about \d+ events", html), "PostgreSQL's estimate, not COUNT(*)"
    else:
        assert "more than 3 events" in html


def test_under_the_limit_the_count_is_exact() -> None:
    paginator = EventLogPaginator(StoredEvent.objects.all(), 10)
    assert paginator.count == 0 and paginator.count_display == "0"
    assert not paginator.estimated and not paginator.capped
    assert EventLogPaginator(list(range(12345)), 10).count_display == "12,345"


@pytest.mark.pgdjango
def test_postgres_estimate_replaces_count_star(small_limit: None) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs Django's database to be PostgreSQL (DATABASE_URL=postgres://…)")
    StoredEvent.objects.bulk_create(
        StoredEvent(
            event_id=str(uuid.uuid4()), type="custom", topic="t", timestamp=datetime.now(timezone.utc)
        )
        for _ in range(50)
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE django_eventbus_event")
    paginator = EventLogPaginator(StoredEvent.objects.order_by("-id"), 10)
    with CaptureQueriesContext(connection) as queries:
        count = paginator.count
    assert paginator.estimated and count >= 50
    assert any("reltuples" in q["sql"] for q in queries.captured_queries)
    filtered = EventLogPaginator(StoredEvent.objects.filter(topic="t").order_by("-id"), 10)
    assert filtered.count == 4 and filtered.capped and filtered.count_display == "more than 3"


# -- read-only --------------------------------------------------------------------------------


def test_no_add_change_or_delete(admin_client: Client, events: list[StoredEvent]) -> None:
    event = events[0]
    assert admin_client.get(reverse("admin:django_eventbus_storedevent_add")).status_code == 403
    assert (
        admin_client.get(reverse("admin:django_eventbus_storedevent_delete", args=[event.pk])).status_code
        == 403
    )
    response = admin_client.post(change_url(event), {"topic": "hacked", "type": "custom"})
    assert response.status_code == 403
    event.refresh_from_db()
    assert event.topic == "inventory:product"
    html = admin_client.get(CHANGELIST).content.decode()
    assert "delete_selected" not in html
    assert reverse("admin:django_eventbus_storedevent_add") not in html


def test_detail_page_is_read_only_pretty_and_escaped(admin_client: Client) -> None:
    event = make_row(
        payload={"name": "<script>alert('x')</script>", "nested": {"ünïcode": [1, 2]}},
        metadata={"by": "<b>me</b>"},
        correlation_id="req-7",
    )
    response = admin_client.get(change_url(event))
    assert response.status_code == 200
    html = response.content.decode()
    assert "<script>alert(" not in html and "<b>me</b>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "&lt;b&gt;me&lt;/b&gt;" in html
    assert "&quot;ünïcode&quot;: [\n      1," in html  # indented, not ASCII-escaped
    assert event.event_id in html and "req-7" in html
    assert f"{CHANGELIST}?q=req-7" in html  # the other events of the same correlation
    assert 'name="_save"' not in html  # view only


def test_pretty_json_escapes() -> None:
    assert (
        str(pretty_json({"a": "<i>"}))
        == '<pre class="eventbus-json">{\n  &quot;a&quot;: &quot;&lt;i&gt;&quot;\n}</pre>'
    )


def test_detail_page_by_event_id(admin_client: Client, events: list[StoredEvent]) -> None:
    # Rows added by live mode only know the event id.
    response = admin_client.get(change_url(events[3].event_id))
    assert response.status_code == 200
    assert events[3].event_id in response.content.decode()
    missing = admin_client.get(change_url(str(uuid.uuid4())))
    assert missing.status_code == 302  # Django's "doesn't exist" redirect to the admin index


def test_view_permission_is_enough_to_read(events: list[StoredEvent]) -> None:
    client = client_for(staff("django_eventbus.view_storedevent"))
    assert client.get(CHANGELIST).status_code == 200
    assert client.get(change_url(events[0])).status_code == 200
    nobody = client_for(staff())
    assert nobody.get(CHANGELIST).status_code == 403
    assert nobody.get(change_url(events[0])).status_code == 403


# -- re-publish ---------------------------------------------------------------------------------


def republish(client: Client, rows: list[StoredEvent], confirmed: bool = True) -> Any:
    """The action as the confirmation page's "Yes" button posts it (or, unconfirmed, as the list does)."""
    data: dict[str, Any] = {"action": "republish", "_selected_action": [str(r.pk) for r in rows]}
    data.update({"post": "yes"} if confirmed else {"index": "0"})
    return client.post(CHANGELIST, data, follow=True)


@pytest.mark.django_db(transaction=True)
def test_republish_shows_what_it_will_do_before_doing_it() -> None:
    rows = [
        make_row(topic="inventory:product"),
        make_row(topic="<script>alert(1)</script>", payload={"x": "<script>alert(2)</script>"}),
    ]
    client = client_for(staff("django_eventbus.view_storedevent", "django_eventbus.republish_storedevent"))
    with capture_events() as captured:
        page = republish(client, rows, confirmed=False)
        html = page.content.decode()
        assert page.status_code == 200 and "Re-publish events?" in html
        assert "Send <strong>2</strong> events" in html
        assert rows[0].event_id in html and rows[1].event_id in html
        assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;: 1" in html
        assert 'name="post" value="yes"' in html and "csrfmiddlewaretoken" in html
        assert list(captured) == []  # nothing sent by the first POST
        response = republish(client, rows)
        captured.wait_for(2)
    assert "Re-published 2 event(s)" in response.content.decode()


@pytest.mark.django_db(transaction=True)
def test_republish_needs_a_post_with_the_csrf_token() -> None:
    rows = [make_row()]
    user = staff("django_eventbus.view_storedevent", "django_eventbus.republish_storedevent")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    data = {"action": "republish", "_selected_action": [str(rows[0].pk)], "post": "yes"}
    with capture_events() as captured:
        client.get(CHANGELIST, data)  # a GET (a link, an <img>) sends nothing, whatever it answers
        assert client.post(CHANGELIST, data).status_code == 403  # a forged cross-site POST
        assert list(captured) == []
        page = client.post(CHANGELIST, {**data, "post": "", "index": "0"}, follow=True)  # no token either
        assert page.status_code == 403
        client.get(CHANGELIST)  # the list sets the CSRF cookie, as a browser visit does
        token = client.cookies["csrftoken"].value
        response = client.post(CHANGELIST, {**data, "csrfmiddlewaretoken": token}, follow=True)
        captured.wait_for(1)
    assert "Re-published 1 event(s)" in response.content.decode()


def test_republish_needs_its_permission(events: list[StoredEvent]) -> None:
    viewer = client_for(staff("django_eventbus.view_storedevent"))
    assert 'value="republish"' not in viewer.get(CHANGELIST).content.decode()
    with capture_events() as captured:
        response = republish(viewer, events[:2])
    assert response.status_code == 200
    assert "Re-published" not in response.content.decode()
    assert list(captured) == []


@pytest.mark.django_db(transaction=True)
def test_republish_sends_the_same_events_again(events: list[StoredEvent]) -> None:
    user = staff("django_eventbus.view_storedevent", "django_eventbus.republish_storedevent")
    client = client_for(user)
    assert 'value="republish"' in client.get(CHANGELIST).content.decode()
    chosen = [events[3], events[1]]
    before = StoredEvent.objects.count()
    with capture_events() as captured:
        response = republish(client, chosen)
        captured.wait_for(2)
    assert "Re-published 2 event(s) with their original event ids." in response.content.decode()
    # Same ids, in log order, same content; nothing new in the log.
    assert [e.event_id for e in captured] == [events[1].event_id, events[3].event_id]
    assert captured[0] == events[1].to_event()
    assert StoredEvent.objects.count() == before


def test_republish_failure_is_reported(
    admin_client: Client, events: list[StoredEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    from django_eventbus.delivery import runtime

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("redis is down")

    monkeypatch.setattr(runtime.BusRunner, "call", broken)
    response = republish(admin_client, events[:1])
    assert "Re-publishing failed after 0 event(s): redis is down" in response.content.decode()


@pytest.mark.django_db(transaction=True)
def test_durable_consumer_skips_a_republished_event_it_handled() -> None:
    from django_eventbus.delivery.consumers import Consumer
    from django_eventbus.delivery.listener import Listener
    from django_eventbus.delivery.runtime import get_runner
    from django_eventbus.events import Event

    old = make_row(topic="audit:thing", payload={"mark": "old"})
    ConsumerCursor.objects.create(name="audit.durable", position=old.pk)  # handled before a restart
    seen: list[str] = []
    consumer = Consumer(name="audit.durable", pattern="audit:*", func=lambda e: seen.append(e.event_id))
    runner = get_runner()

    async def start(bus: Any) -> Listener:
        listener = Listener(bus, [consumer], interval=3600)
        await listener.start()
        return listener

    listener = runner.call(start)
    try:
        event: Event = old.to_event()
        runner.call(lambda bus: bus.publish_many([event]))
        runner.flush()
        assert seen == []
    finally:
        runner.call(lambda bus: listener.stop())


# -- live mode -----------------------------------------------------------------------------------


def live_config(response: Any) -> dict[str, Any] | None:
    match = re.search(
        r'<script id="eventbus-live-config" type="application/json">(.*?)</script>', response.content.decode()
    )
    return json.loads(match.group(1)) if match else None


def test_live_toggle_for_users_who_may_see_the_log(events: list[StoredEvent]) -> None:
    client = client_for(staff("django_eventbus.view_storedevent"))
    response = client.get(CHANGELIST + "?type__exact=created&topic=inventory:order&q=x")
    html = response.content.decode()
    assert 'id="eventbus-live-toggle"' in html
    assert "django_eventbus/admin-live.js" in html
    config = live_config(response)
    assert config is not None
    assert config["url"] == "/ws/events/"
    assert config["filters"] == {"type": "created", "topic": "inventory:order", "source": None, "q": "x"}
    assert config["detail_url"] == change_url("__id__")
    assert config["types"]["created"] == "Created"


def test_live_toggle_can_be_turned_off(admin_client: Client, settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "ADMIN_WEBSOCKET_URL": None}
    html = admin_client.get(CHANGELIST).content.decode()
    assert "eventbus-live-toggle" not in html and "admin-live.js" not in html


def test_live_config_is_escaped(admin_client: Client) -> None:
    response = admin_client.get(CHANGELIST, {"q": "</script><script>alert(1)</script>"})
    config = live_config(response)
    assert config is not None and config["filters"]["q"] == "</script><script>alert(1)</script>"
    assert "<script>alert(1)" not in response.content.decode()


# -- dead letters and cursors ---------------------------------------------------------------------


def test_dead_letters_and_cursors_are_listed(admin_client: Client) -> None:
    letter = DeadLetter.objects.create(
        consumer="inventory.low_stock",
        event_id=str(uuid.uuid4()),
        topic="inventory:product",
        event={"payload": "<img src=x>"},
        error="Traceback…\nValueError: <bad>",
        attempts=4,
    )
    ConsumerCursor.objects.create(name="inventory.low_stock", position=12)
    html = admin_client.get(reverse("admin:django_eventbus_deadletter_changelist")).content.decode()
    assert "ValueError: &lt;bad&gt;" in html
    html = admin_client.get(
        reverse("admin:django_eventbus_deadletter_change", args=[letter.pk])
    ).content.decode()
    assert "&lt;img src=x&gt;" in html and "<img src=x>" not in html
    html = admin_client.get(reverse("admin:django_eventbus_consumercursor_changelist")).content.decode()
    assert "inventory.low_stock" in html and ">12<" in html
    assert admin_client.get(reverse("admin:django_eventbus_deadletter_add")).status_code == 403
    assert admin_client.get(reverse("admin:django_eventbus_consumercursor_add")).status_code == 403
