"""eventbus_publish, eventbus_prune, eventbus_status and the deploy checks: every option, every error."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from django_eventbus.checks import check_deploy
from django_eventbus.delivery.consumers import Consumer, register, unregister
from django_eventbus.events.bus import mask_secret
from django_eventbus.management.commands.eventbus_prune import delete_in_batches, parse_duration
from django_eventbus.models import ConsumerCursor, DeadLetter, StoredEvent
from django_eventbus.testing import capture_events

NOW = datetime.now(timezone.utc)


def run(*args: Any, **options: Any) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def log_rows(*ages: timedelta, topic: str = "inventory:product") -> list[StoredEvent]:
    """Rows in log order (increasing ids), one per age."""
    return [
        StoredEvent.objects.create(
            event_id=str(uuid.uuid4()), type="created", topic=topic, payload={"i": i}, timestamp=NOW - age
        )
        for i, age in enumerate(ages)
    ]


def remaining() -> list[int]:
    return list(StoredEvent.objects.order_by("id").values_list("payload__i", flat=True))


# -- eventbus_publish ------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_publish_records_publishes_and_prints_the_id() -> None:
    with capture_events("billing:*") as captured:
        out, err = run(
            "eventbus_publish",
            "billing:invoice-paid",
            "--type",
            "updated",
            "--payload",
            '{"invoice": 7, "total": "12.50", "tags": ["a"]}',
            "--metadata",
            '{"by": "ops"}',
            "--correlation-id",
            "ticket-1234",
            "--source",
            "ops-shell",
        )
        captured.wait_for(1)
    event_id = out.strip()
    [event] = captured
    assert event.event_id == event_id
    assert event.type.value == "updated" and event.topic == "billing:invoice-paid"
    assert event.payload == {"invoice": 7, "total": "12.50", "tags": ["a"]}
    assert event.metadata == {"by": "ops"}
    assert event.correlation_id == "ticket-1234" and event.source == "ops-shell"
    row = StoredEvent.objects.get(event_id=event_id)
    assert row.to_event() == event
    assert "memory bus delivers inside this process only" in err


@pytest.mark.django_db(transaction=True)
def test_publish_defaults() -> None:
    out, _ = run("eventbus_publish", "ops:ping")
    row = StoredEvent.objects.get(event_id=out.strip())
    assert row.type == "custom" and row.payload == {} and row.metadata == {}
    assert row.correlation_id is None and row.source  # host:pid


@pytest.mark.django_db(transaction=True)
def test_publish_without_the_log(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "STORE_EVENTS": False}
    with capture_events() as captured:
        out, err = run("eventbus_publish", "ops:ping")
        captured.wait_for(1)
    assert captured[0].event_id == out.strip()
    assert not StoredEvent.objects.exists()
    assert "(it is in the event log)" not in err


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--payload", "{name: 1}"],
            "--payload is not valid JSON: Expecting property name enclosed in double quotes",
        ),
        (["--payload", "{name: 1}"], "Quote it for the shell"),
        (["--payload", "[1, 2]"], "--payload must be a JSON object ({...}), not an array."),
        (["--payload", '"text"'], "not a string"),
        (["--payload", "3"], "not a number"),
        (["--payload", "null"], "not null"),
        (["--payload", "true"], "not a boolean"),
        (["--metadata", "[]"], "--metadata must be a JSON object"),
        (["--payload", '{"x": NaN}'], "not JSON-serializable"),
    ],
)
def test_publish_rejects_bad_json(args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as error:
        run("eventbus_publish", "ops:ping", *args)
    assert message in str(error.value)
    assert not StoredEvent.objects.exists()


@pytest.mark.django_db
def test_publish_rejects_bad_topic_and_type() -> None:
    with pytest.raises(CommandError, match="TOPIC must not be empty"):
        run("eventbus_publish", "  ")
    with pytest.raises(CommandError, match="invalid choice: 'explode'"):
        run("eventbus_publish", "ops:ping", "--type", "explode")


def test_publish_is_atomic_with_the_log(monkeypatch: pytest.MonkeyPatch, transactional_db: None) -> None:
    from django_eventbus.capture import outbox

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(outbox, "record", fail)
    with capture_events() as captured, pytest.raises(RuntimeError, match="disk full"):
        run("eventbus_publish", "ops:ping")
    assert list(captured) == [] and not StoredEvent.objects.exists()


# -- eventbus_prune --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("7d", 7 * 86400),
        ("12h", 43200),
        ("30m", 1800),
        ("3600s", 3600),
        ("3600", 3600),
        ("2w", 1209600),
        (" 5 D ", 432000),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7 days", "1.5h", "-3d", "d", "7y"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.django_db
def test_prune_default_is_the_retention_setting(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "RETENTION": 3600}
    log_rows(timedelta(hours=3), timedelta(hours=2), timedelta(minutes=30), timedelta(0))
    out, err = run("eventbus_prune")
    assert "Deleted 2 event(s) older than" in out and "in 1 batch(es)" in out
    assert remaining() == [2, 3] and err == ""


@pytest.mark.django_db
def test_prune_older_than() -> None:
    log_rows(timedelta(days=10), timedelta(days=8), timedelta(days=1), timedelta(hours=1))
    out, _ = run("eventbus_prune", "--older-than", "2d")
    assert "Deleted 2 event(s)" in out
    assert remaining() == [2, 3]
    run("eventbus_prune", "--older-than", "30m")
    assert remaining() == []


@pytest.mark.django_db
def test_prune_keep_alone_keeps_the_newest_n() -> None:
    log_rows(*(timedelta(minutes=5 - i) for i in range(5)))  # all young
    out, _ = run("eventbus_prune", "--keep", "2")
    assert "Deleted 3 event(s) beyond the newest 2" in out
    assert remaining() == [3, 4]
    run("eventbus_prune", "--keep", "5")
    assert remaining() == [3, 4]
    run("eventbus_prune", "--keep", "0")
    assert remaining() == []


@pytest.mark.django_db
def test_prune_keep_with_age_needs_both() -> None:
    log_rows(timedelta(days=9), timedelta(days=8), timedelta(days=7, hours=1), timedelta(hours=1))
    # Older than 2 days: rows 0, 1, 2; beyond the newest 2: rows 0, 1. Both: 0 and 1.
    out, _ = run("eventbus_prune", "--older-than", "2d", "--keep", "2")
    assert "older than" in out and "and beyond the newest 2" in out
    assert remaining() == [2, 3]


@pytest.mark.django_db
def test_prune_dry_run_deletes_nothing() -> None:
    log_rows(timedelta(days=10), timedelta(days=9), timedelta(0))
    DeadLetter.objects.create(consumer="c", event_id="x", topic="t", event={}, error="e", attempts=1)
    DeadLetter.objects.filter(consumer="c").update(created_at=NOW - timedelta(days=30))
    out, _ = run("eventbus_prune", "--older-than", "7d", "--dry-run", "--dead-letters")
    assert "Would delete 2 event(s) older than" in out
    assert "Would delete 1 dead letter(s)" in out
    assert remaining() == [0, 1, 2] and DeadLetter.objects.count() == 1


@pytest.mark.django_db
def test_prune_in_batches() -> None:
    log_rows(*(timedelta(days=10) for _ in range(7)), timedelta(0))
    with CaptureQueriesContext(connection) as queries:
        out, _ = run("eventbus_prune", "--older-than", "1d", "--batch-size", "3")
    assert "Deleted 7 event(s)" in out and "in 3 batch(es)" in out
    deletes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 3
    for sql in deletes:
        assert '"id" >= ' in sql and '"id" <= ' in sql  # a primary-key range, not the whole table
    assert remaining() == [7]


@pytest.mark.django_db
def test_delete_in_batches_skips_id_gaps() -> None:
    rows = log_rows(*(timedelta(days=2) for _ in range(6)))
    StoredEvent.objects.filter(pk__in=[rows[1].pk, rows[2].pk]).delete()
    deleted, batches = delete_in_batches(StoredEvent.objects.all(), 2, 0.0, "default")
    assert (deleted, batches) == (4, 2)


@pytest.mark.django_db
def test_prune_never_deletes_what_a_durable_consumer_has_not_handled() -> None:
    rows = log_rows(*(timedelta(days=10) for _ in range(5)))
    ConsumerCursor.objects.create(name="inventory.fast", position=rows[4].pk)
    ConsumerCursor.objects.create(name="inventory.slow", position=rows[1].pk)
    out, err = run("eventbus_prune", "--older-than", "1d")
    assert "Deleted 2 event(s)" in out
    assert f"Keeping events after log id {rows[1].pk}" in err
    assert "inventory.slow" in err and "inventory.fast" not in err and "--force" in err
    assert remaining() == [2, 3, 4]


@pytest.mark.django_db
def test_prune_dry_run_respects_cursors_too() -> None:
    rows = log_rows(*(timedelta(days=10) for _ in range(3)))
    ConsumerCursor.objects.create(name="c", position=rows[0].pk)
    out, err = run("eventbus_prune", "--older-than", "1d", "--dry-run")
    assert "Would delete 1 event(s)" in out and "Keeping events after" in err


@pytest.mark.django_db
def test_prune_force_deletes_anyway() -> None:
    rows = log_rows(*(timedelta(days=10) for _ in range(3)))
    ConsumerCursor.objects.create(name="inventory.slow", position=rows[0].pk)
    out, err = run("eventbus_prune", "--older-than", "1d", "--force")
    assert "Deleted 3 event(s)" in out
    assert "--force: deleting events that durable consumer(s) inventory.slow have not handled" in err
    assert remaining() == []


@pytest.mark.django_db
def test_prune_cursors_that_hold_nothing_back_say_nothing() -> None:
    rows = log_rows(timedelta(days=10), timedelta(0))
    ConsumerCursor.objects.create(name="c", position=rows[0].pk)  # behind, but only on young rows
    out, err = run("eventbus_prune", "--older-than", "1d")
    assert "Deleted 1 event(s)" in out and err == ""


@pytest.mark.django_db
def test_prune_dead_letters_only_when_asked() -> None:
    for consumer, age in (("old", 30), ("new", 1)):
        DeadLetter.objects.create(consumer=consumer, event_id="x", topic="t", event={}, error="e", attempts=1)
        DeadLetter.objects.filter(consumer=consumer).update(created_at=NOW - timedelta(days=age))
    run("eventbus_prune", "--older-than", "7d")
    assert DeadLetter.objects.count() == 2
    out, _ = run("eventbus_prune", "--older-than", "7d", "--dead-letters")
    assert "Deleted 1 dead letter(s)." in out
    assert list(DeadLetter.objects.values_list("consumer", flat=True)) == ["new"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args, message",
    [
        (["--older-than", "a week"], "--older-than: 'a week' is not a duration"),
        (["--keep", "-1"], "--keep must be 0 or more"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--pause", "-1"], "--pause must be 0 or more"),
        (["--keep", "5", "--dead-letters"], "--dead-letters needs an age"),
    ],
)
def test_prune_errors(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run("eventbus_prune", *args)


@pytest.mark.django_db
def test_prune_with_retention_off_needs_explicit_options(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "RETENTION": 0}
    with pytest.raises(CommandError, match="give --older-than or --keep"):
        run("eventbus_prune")


@pytest.mark.django_db
def test_prune_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("django_eventbus.management.commands.eventbus_prune.time.sleep", slept.append)
    log_rows(*(timedelta(days=3) for _ in range(4)))
    run("eventbus_prune", "--older-than", "1d", "--batch-size", "2", "--pause", "0.25")
    assert slept == [0.25, 0.25]


# -- eventbus_status -------------------------------------------------------------------------------


@pytest.fixture
def durable_consumers() -> Iterator[None]:
    register(Consumer(name="test.products", pattern="inventory:product", func=lambda e: None))
    register(Consumer(name="test.never_ran", pattern="inventory:*", func=lambda e: None))
    register(Consumer(name="test.volatile", pattern="*", func=lambda e: None, durable=False))
    yield
    for name in ("test.products", "test.never_ran", "test.volatile"):
        unregister(name)


@pytest.mark.django_db
def test_status_json(durable_consumers: None) -> None:
    rows = log_rows(timedelta(minutes=10), timedelta(minutes=5), timedelta(minutes=4), timedelta(minutes=1))
    # Row 2 is another topic; row 3 was handled live above the position.
    StoredEvent.objects.filter(pk=rows[2].pk).update(topic="inventory:order")
    ConsumerCursor.objects.create(name="test.products", position=rows[0].pk, handled=[rows[3].event_id])
    ConsumerCursor.objects.create(name="retired.consumer", position=rows[2].pk)
    out, _ = run("eventbus_status", "--json")
    status = json.loads(out)
    assert status["bus"] == {
        "backend": "memory",
        "target": "this process only",
        "connected": True,
        "error": None,
    }
    log = status["log"]
    assert log["events"] == 4 and log["estimated"] is False
    assert log["first_id"] == rows[0].pk and log["last_id"] == rows[3].pk
    assert log["store_events"] is True and log["retention_seconds"] == 7 * 86400
    assert set(status["counters"]) == {
        "published",
        "delivered",
        "dropped",
        "handler_errors",
        "invalid_messages",
        "reconnects",
    }
    consumers = {c["name"]: c for c in status["consumers"]}
    assert "test.volatile" not in consumers  # not durable: no cursor, no lag
    products = consumers["test.products"]
    assert products["position"] == rows[0].pk and products["registered"] is True
    assert products["lag_events"] == 1  # row 1 only: row 2 does not match, row 3 was handled
    assert 290 < products["lag_seconds"] < 400  # row 1 is 5 minutes old
    assert consumers["test.never_ran"]["position"] is None
    retired = consumers["retired.consumer"]
    assert retired["registered"] is False and retired["lag_events"] == 1  # any topic counts


@pytest.mark.django_db
def test_status_text(durable_consumers: None) -> None:
    rows = log_rows(timedelta(minutes=3), timedelta(minutes=2))
    ConsumerCursor.objects.create(name="test.products", position=rows[1].pk)
    out, _ = run("eventbus_status")
    assert "Bus:        memory (this process only): connected" in out
    assert f"Event log:  2 events in {connection.vendor}, ids {rows[0].pk}..{rows[1].pk}" in out
    assert "Counters (this process): published " in out and "handler errors" in out
    assert f"test.products  [inventory:product]  position {rows[1].pk}, lag 0 event(s), 0.0 s behind" in out
    assert "test.never_ran  [inventory:*]  no cursor yet" in out


@pytest.mark.django_db
def test_status_of_an_empty_log() -> None:
    out, _ = run("eventbus_status")
    assert "Event log:  0 events" in out and "oldest -, newest -" in out
    status = json.loads(run("eventbus_status", "--json")[0])
    assert status["log"]["last_id"] is None


@pytest.mark.django_db
def test_status_lag_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    from django_eventbus.management.commands import eventbus_status

    monkeypatch.setattr(eventbus_status, "LAG_SCAN_LIMIT", 2)
    log_rows(timedelta(minutes=3), timedelta(minutes=2), timedelta(minutes=1))
    ConsumerCursor.objects.create(name="far.behind", position=0)
    out, _ = run("eventbus_status")
    assert "far.behind  [(not registered in this process)]  position 0, lag 2+ event(s)" in out


@pytest.mark.django_db
def test_status_counters_come_from_this_process(transactional_db: None) -> None:
    run("eventbus_publish", "ops:ping")
    status = json.loads(run("eventbus_status", "--json")[0])
    assert status["counters"]["published"] >= 1


@pytest.mark.django_db
@pytest.mark.redis
def test_status_reports_a_bus_that_does_not_connect() -> None:
    from django_eventbus.delivery.runtime import reset_runner

    with override_settings(EVENTBUS={"BUS": "redis://:s3cret@127.0.0.1:1/0"}):
        try:
            status = json.loads(run("eventbus_status", "--json", "--timeout", "3")[0])
            out, _ = run("eventbus_status", "--timeout", "3")
        finally:
            reset_runner()
    assert status["bus"]["connected"] is False
    assert status["bus"]["target"] == "redis://:***@127.0.0.1:1/0"
    assert "s3cret" not in out
    assert "Error" in status["bus"]["error"] or "no connection" in status["bus"]["error"]
    assert "redis (redis://:***@127.0.0.1:1/0): NOT CONNECTED" in out


@pytest.mark.django_db
def test_status_of_an_invalid_bus_setting() -> None:
    with override_settings(EVENTBUS={"BUS": "kafka://x"}):
        status = json.loads(run("eventbus_status", "--json")[0])
    assert status["bus"]["connected"] is False and "invalid BUS setting" in status["bus"]["error"]


@pytest.mark.parametrize(
    "target, masked",
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:pw@host/1", "rediss://user:***@host/1"),
        ("postgres://u@h/db", "postgres://u@h/db"),
        ("redis+sentinel://:pw@s1:26379,s2:26380/m/0", "redis+sentinel://:***@s1:26379,s2:26380/m/0"),
        ("host=h user=u password=pw dbname=d", "host=h user=u password=*** dbname=d"),
        ("host=h password='p w' dbname=d", "host=h password=*** dbname=d"),
    ],
)
def test_mask_secret(target: str, masked: str) -> None:
    assert mask_secret(target) == masked


@pytest.mark.django_db
def test_status_describes_the_django_database_bus() -> None:
    from django_eventbus.management.commands.eventbus_status import describe_target

    assert describe_target({"backend": "postgres"}, True, "default") == "Django database 'default'"
    assert describe_target({"backend": "redis", "host": "r", "port": 6380}, False, "default") == "r:6380"
    assert describe_target({"backend": "custom"}, False, "default") is None


@pytest.mark.pgdjango
@pytest.mark.django_db
def test_status_estimates_a_big_log_on_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs Django's database to be PostgreSQL (DATABASE_URL=postgres://…)")
    from django_eventbus.management.commands import eventbus_status

    monkeypatch.setattr(eventbus_status, "EXACT_COUNT_LIMIT", 3)
    log_rows(*(timedelta(minutes=i) for i in range(6)))
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE django_eventbus_event")
    status = json.loads(run("eventbus_status", "--json")[0])
    assert status["log"]["estimated"] is True and status["log"]["events"] >= 6
    assert "about " in run("eventbus_status")[0]


# -- deploy checks ---------------------------------------------------------------------------------


def ids() -> list[str | None]:
    return [m.id for m in check_deploy()]


@override_settings(DEBUG=False)
def test_memory_bus_in_production_warns() -> None:
    with override_settings(EVENTBUS={"BUS": "memory://"}):
        assert "django_eventbus.W001" in ids()
    with override_settings(EVENTBUS={"BUS": "redis://localhost:6379/0"}):
        assert "django_eventbus.W001" not in ids()


def test_missing_channel_layer_warns(settings: Any) -> None:
    settings.EVENTBUS = {"BUS": "redis://localhost:6379/0"}
    del settings.CHANNEL_LAYERS
    [warning] = [m for m in check_deploy() if m.id == "django_eventbus.W002"]
    assert "CHANNEL_LAYERS is not set" in warning.msg and "RedisPubSubChannelLayer" in str(warning.hint)
    settings.EVENTBUS = {"BUS": "redis://localhost:6379/0", "CHANNELS": False}
    assert "django_eventbus.W002" not in ids()


def test_channel_layer_present_does_not_warn(settings: Any) -> None:
    settings.EVENTBUS = {"BUS": "redis://localhost:6379/0"}
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer"}}
    assert "django_eventbus.W002" not in ids()


def test_no_channels_app_no_warning(settings: Any) -> None:
    settings.INSTALLED_APPS = [a for a in settings.INSTALLED_APPS if a not in ("channels", "daphne")]
    del settings.CHANNEL_LAYERS
    assert "django_eventbus.W002" not in ids()


def test_durable_consumers_without_the_log_warn(settings: Any, durable_consumers: None) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "STORE_EVENTS": False}
    [warning] = [m for m in check_deploy() if m.id == "django_eventbus.W003"]
    assert "test.products" in warning.msg and "test.volatile" not in warning.msg
    assert "durable=False" in str(warning.hint)
    settings.EVENTBUS = {**settings.EVENTBUS, "STORE_EVENTS": True}
    assert "django_eventbus.W003" not in ids()


def test_no_durable_consumer_no_warning(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from django_eventbus.delivery import consumers

    monkeypatch.setattr(consumers, "_registry", {})
    settings.EVENTBUS = {**settings.EVENTBUS, "STORE_EVENTS": False}
    assert "django_eventbus.W003" not in ids()


@override_settings(DEBUG=False, EVENTBUS={"BUS": "memory://", "STORE_EVENTS": False})
def test_check_deploy_command_shows_the_warnings(durable_consumers: None) -> None:
    out, err = run("check", "--deploy")
    text = out + err
    assert "django_eventbus.W001" in text and "django_eventbus.W003" in text
