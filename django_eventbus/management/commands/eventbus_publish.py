"""``manage.py eventbus_publish TOPIC [--type T] [--payload JSON]``: publish one custom event."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import transaction

from django_eventbus.capture.outbox import flush_pending
from django_eventbus.capture.publishing import make_event, publish
from django_eventbus.conf import conf
from django_eventbus.events import EventType
from django_eventbus.events.codec import loads
from django_eventbus.events.errors import EventSerializationError
from django_eventbus.management.base import EventbusCommand


class Command(EventbusCommand):
    help = (
        "Publish one event: recorded in the event log (STORE_EVENTS) and sent through the bus. "
        "Prints its event id."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("topic", help='The topic, e.g. "inventory:product" or "billing:invoice-paid".')
        parser.add_argument(
            "--type",
            default=EventType.CUSTOM.value,
            choices=[t.value for t in EventType],
            help="The event type (default: custom).",
        )
        parser.add_argument("--payload", default="{}", help="The payload, a JSON object (default: {}).")
        parser.add_argument("--metadata", default="{}", help="The metadata, a JSON object (default: {}).")
        parser.add_argument("--correlation-id", help="Correlation id (default: none).")
        parser.add_argument("--source", help="Source of the event (default: EVENTBUS['SOURCE'] or host:pid).")
        parser.add_argument(
            "--database",
            default=None,
            help="The database alias the event log is written to (default: EVENTBUS['DATABASE_ALIAS']).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        topic: str = options["topic"].strip()
        if not topic:
            raise CommandError("TOPIC must not be empty.")
        payload = parse_object(options["payload"], "--payload")
        metadata = parse_object(options["metadata"], "--metadata")
        extra: dict[str, Any] = {"metadata": metadata}
        for key in ("correlation_id", "source"):
            if options[key]:
                extra[key] = options[key]
        event = make_event(topic, options["type"], payload, **extra)
        using = options["database"] or conf.DATABASE_ALIAS
        try:
            with transaction.atomic(using=using):
                event = publish(topic, event, using=using)
        except EventSerializationError as exc:
            raise CommandError(str(exc)) from exc
        # Publishing happens after commit, in the background: wait for it before the process exits.
        flush_pending()
        if conf.raw_bus_config().get("backend") == "memory":
            self.stderr.write(
                "Note: the memory bus delivers inside this process only; other processes will not "
                "receive the event" + (" (it is in the event log)." if conf.STORE_EVENTS else ".")
            )
        self.stdout.write(event.event_id)


def parse_object(text: str, option: str) -> dict[str, Any]:
    """``text`` as a JSON object, or a :class:`CommandError` that says what is wrong with it."""
    try:
        value = loads(text)  # the codec's: nesting too deep for the rest of the app is refused here
    except ValueError as exc:
        cause = exc.__cause__
        if isinstance(cause, json.JSONDecodeError):
            raise CommandError(
                f"{option} is not valid JSON: {cause.msg} at line {cause.lineno} column {cause.colno}. "
                f"""Quote it for the shell, e.g. {option} '{{"name": "x"}}'."""
            ) from exc
        raise CommandError(f"{option}: {exc}") from exc
    if not isinstance(value, dict):
        raise CommandError(f"{option} must be a JSON object ({{...}}), not {_json_kind(value)}.")
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"
