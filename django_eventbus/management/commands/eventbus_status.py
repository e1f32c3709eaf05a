"""``manage.py eventbus_status [--json]``: the bus, the event log, this process's counters, consumer lag."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from django.core.management.base import CommandParser
from django.db import connections
from django.utils import timezone

from django_eventbus.conf import conf
from django_eventbus.delivery.consumers import get_consumers
from django_eventbus.events.base import BaseEventBus
from django_eventbus.events.bus import mask_secret
from django_eventbus.management.base import EventbusCommand
from django_eventbus.metrics import estimated_rows, get_stats
from django_eventbus.models import ConsumerCursor, StoredEvent

#: Log rows read after a cursor to measure its lag; beyond that the lag is reported as "at least".
LAG_SCAN_LIMIT = 10_000
#: Up to this many rows the log size is counted exactly; beyond it PostgreSQL's estimate is used.
EXACT_COUNT_LIMIT = 100_000


class Command(EventbusCommand):
    help = (
        "Show the event bus backend and whether it connects, the size of the event log, this "
        "process's counters and, for each durable consumer, its cursor, lag and owning listener."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
        parser.add_argument(
            "--timeout", type=float, default=5.0, help="Seconds to wait for the bus to connect (default 5)."
        )
        parser.add_argument("--database", default=None, help="Database alias (default: DATABASE_ALIAS).")

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["database"] or conf.DATABASE_ALIAS
        status = {
            "bus": bus_status(options["timeout"]),
            "log": log_status(using),
            "counters": get_stats(),
            "consumers": consumer_status(using),
        }
        if options["json"]:
            self.stdout.write(json.dumps(status, indent=2, default=_json_default))
        else:
            self.stdout.write(format_text(status))


# -- gathering ------------------------------------------------------------------------


def bus_status(timeout: float) -> dict[str, Any]:
    """Backend name, where it points (secrets masked) and whether it connects within ``timeout``."""
    try:
        config = conf.raw_bus_config()
    except (TypeError, ValueError) as exc:
        return {"backend": None, "target": None, "connected": False, "error": f"invalid BUS setting: {exc}"}
    result: dict[str, Any] = {
        "backend": config.get("backend"),
        "target": describe_target(config, conf.uses_django_database(), conf.DATABASE_ALIAS),
        "connected": False,
        "error": None,
    }
    from django_eventbus.delivery.runtime import get_runner

    try:
        get_runner().call(_ping, timeout=timeout)
    except TimeoutError:
        result["error"] = f"no connection within {timeout:g} s"
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    else:
        result["connected"] = True
    return result


async def _ping(bus: BaseEventBus) -> str:
    # Getting here means the runner built and connected the bus.
    return bus.state.value


def describe_target(config: dict[str, Any], django_database: bool, alias: str) -> str | None:
    """Where the bus connects, without passwords."""
    if config.get("backend") == "memory":
        return "this process only"
    if django_database:
        return f"Django database {alias!r}"
    for key in ("url", "connection_string"):
        if config.get(key):
            return mask_secret(str(config[key]))
    if config.get("host"):
        return f"{config['host']}:{config.get('port', '')}".rstrip(":")
    return None


def log_status(using: str) -> dict[str, Any]:
    """Events in the log (exact when small or not on PostgreSQL, else the planner's estimate)."""
    events = StoredEvent.objects.using(using)
    counted = events.order_by()[: EXACT_COUNT_LIMIT + 1].count()
    estimated = False
    if counted > EXACT_COUNT_LIMIT:
        estimate = estimated_rows(StoredEvent, using)
        if estimate is not None:
            counted, estimated = max(estimate, counted), True
        else:
            counted = events.count()
    newest = events.order_by("-id").values_list("id", "timestamp").first()
    oldest = events.order_by("id").values_list("id", "timestamp").first()
    return {
        "events": counted,
        "estimated": estimated,
        "store_events": conf.STORE_EVENTS,
        "retention_seconds": conf.RETENTION,
        "first_id": oldest[0] if oldest else None,
        "oldest": oldest[1] if oldest else None,
        "last_id": newest[0] if newest else None,
        "newest": newest[1] if newest else None,
        "database": connections[using].vendor,
    }


def consumer_status(using: str) -> list[dict[str, Any]]:
    """Each durable consumer (registered, or with a cursor row) with its position and lag."""
    registered = {c.name: c for c in get_consumers() if c.durable}
    cursors = {c.name: c for c in ConsumerCursor.objects.using(using)}
    now = timezone.now()
    result = []
    for name in sorted(set(registered) | set(cursors)):
        consumer = registered.get(name)
        cursor = cursors.get(name)
        item: dict[str, Any] = {
            "name": name,
            "pattern": consumer.pattern if consumer else None,
            "registered": consumer is not None,
            "position": cursor.position if cursor else None,
            "cursor_updated": cursor.updated_at if cursor else None,
            **owner_status(cursor, now),
            "lag_events": None,
            "lag_capped": False,
            "lag_seconds": None,
        }
        if cursor is not None:
            handled = set(cursor.handled or ())
            rows = list(
                StoredEvent.objects.using(using)
                .filter(id__gt=cursor.position)
                .order_by("id")
                .values_list("event_id", "topic", "timestamp")[:LAG_SCAN_LIMIT]
            )
            # A consumer only lags on the events it would handle: its pattern, minus those
            # already handled live above the position.
            pending = [
                timestamp
                for event_id, topic, timestamp in rows
                if event_id not in handled and (consumer is None or consumer.matches(topic))
            ]
            item["lag_events"] = len(pending)
            item["lag_capped"] = len(rows) >= LAG_SCAN_LIMIT
            item["lag_seconds"] = round((now - pending[0]).total_seconds(), 3) if pending else 0.0
        result.append(item)
    return result


def owner_status(cursor: ConsumerCursor | None, now: datetime) -> dict[str, Any]:
    """Who holds the consumer's lease (host, pid), since when, and until when unless renewed."""
    if cursor is None or not cursor.owner or cursor.expires_at is None or cursor.expires_at <= now:
        # Free, released or expired: the next listener to try takes it.
        return dict.fromkeys(("owner", "owner_host", "owner_pid", "owner_since", "lease_expires"))
    host, _, rest = cursor.owner.partition(":")
    pid = rest.partition(":")[0]
    return {
        "owner": cursor.owner,
        "owner_host": host,
        "owner_pid": int(pid) if pid.isdigit() else None,
        "owner_since": cursor.owner_since,
        "lease_expires": cursor.expires_at,
    }


# -- output -------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _time(value: datetime | None) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S %Z") if value else "-"


def format_text(status: dict[str, Any]) -> str:
    bus, log, counters = status["bus"], status["log"], status["counters"]
    state = "connected" if bus["connected"] else f"NOT CONNECTED ({bus['error']})"
    target = f" ({bus['target']})" if bus["target"] else ""
    size = f"{'about ' if log['estimated'] else ''}{log['events']:,}"
    lines = [
        f"Bus:        {bus['backend']}{target}: {state}",
        f"Event log:  {size} events in {log['database']}"
        + (f", ids {log['first_id']}..{log['last_id']}" if log["last_id"] is not None else ""),
        f"            oldest {_time(log['oldest'])}, newest {_time(log['newest'])}",
        f"            STORE_EVENTS {'on' if log['store_events'] else 'OFF'}, "
        f"RETENTION {log['retention_seconds']} s",
        "Counters (this process): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counters.items()),
    ]
    consumers = status["consumers"]
    lines.append("Durable consumers:" + ("" if consumers else " none"))
    for item in consumers:
        if item["position"] is None:
            detail = "no cursor yet (starts at the end of the log when eventbus_listen first runs it)"
        else:
            lag = f"{item['lag_events']}{'+' if item['lag_capped'] else ''} event(s)"
            detail = f"position {item['position']}, lag {lag}, {item['lag_seconds']} s behind"
            if item["owner"]:
                detail += (
                    f"; owner {item['owner_host']} pid {item['owner_pid']} since {_time(item['owner_since'])}"
                )
            elif item["registered"]:
                detail += "; no owner (no listener runs it)"
        pattern = item["pattern"] or "(not registered in this process)"
        lines.append(f"  {item['name']}  [{pattern}]  {detail}")
    return "\n".join(lines)
