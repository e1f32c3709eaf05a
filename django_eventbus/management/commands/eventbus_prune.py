"""``manage.py eventbus_prune [--older-than 7d] [--keep N] [--dry-run] [--force]``: trim the event log.

Deletes in batches of ``--batch-size`` rows, each its own short transaction
selected by primary key range, so the table is never locked for long and a
busy publisher only ever waits for one small batch. Never deletes a row that
a durable consumer has not handled yet (above the lowest cursor position)
unless ``--force``.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from django_eventbus.conf import conf
from django_eventbus.management.base import EventbusCommand
from django_eventbus.models import ConsumerCursor, DeadLetter, StoredEvent

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> timedelta:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"3600s"``, ``"2w"`` or plain seconds (``"3600"``)."""
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(
            f"{text!r} is not a duration: use a whole number with a unit, "
            "e.g. 7d, 12h, 30m, 3600s (or plain seconds)"
        )
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2) or "s"])


class Command(EventbusCommand):
    help = (
        "Delete old events from the event log (default: older than EVENTBUS['RETENTION']), in small "
        "batches, never deleting events a durable consumer has not handled yet unless --force."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            metavar="AGE",
            help="Delete events older than AGE (7d, 12h, 30m, 3600s). "
            "Default: EVENTBUS['RETENTION'] seconds, unless --keep is given alone.",
        )
        parser.add_argument(
            "--keep",
            type=int,
            metavar="N",
            help="Always keep the newest N events. Alone, delete everything but the newest N.",
        )
        parser.add_argument("--dry-run", action="store_true", help="Only say what would be deleted.")
        parser.add_argument(
            "--force",
            action="store_true",
            help="Also delete events durable consumers have not handled yet (they will never see them).",
        )
        parser.add_argument(
            "--dead-letters",
            action="store_true",
            help="Also delete dead letters older than the same age (they are kept by default).",
        )
        parser.add_argument("--batch-size", type=int, default=5000, help="Rows per DELETE (default 5000).")
        parser.add_argument(
            "--pause",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="Sleep between batches, to leave room to other writers and replicas (default 0).",
        )
        parser.add_argument("--database", default=None, help="Database alias (default: DATABASE_ALIAS).")

    def handle(self, *args: Any, **options: Any) -> None:
        using: str = options["database"] or conf.DATABASE_ALIAS
        keep: int | None = options["keep"]
        if keep is not None and keep < 0:
            raise CommandError("--keep must be 0 or more.")
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1.")
        if options["pause"] < 0:
            raise CommandError("--pause must be 0 or more.")
        cutoff = self.cutoff(options["older_than"], keep)
        if cutoff is None and options["dead_letters"]:
            raise CommandError("--dead-letters needs an age: give --older-than (or drop --keep).")

        events = StoredEvent.objects.using(using)
        candidates = events.all()
        if cutoff is not None:
            candidates = candidates.filter(timestamp__lt=cutoff)
        if keep is not None:
            candidates = candidates.filter(id__lte=self.keep_bound(events, keep))
        candidates = self.protect_cursors(candidates, options["force"])

        what = self.describe(cutoff, keep)
        if options["dry_run"]:
            count = candidates.count()
            self.stdout.write(f"Would delete {count} event(s) {what}.")
            if options["dead_letters"] and cutoff is not None:
                dead = DeadLetter.objects.using(using).filter(created_at__lt=cutoff).count()
                self.stdout.write(
                    f"Would delete {dead} dead letter(s) older than {cutoff:%Y-%m-%d %H:%M:%S%z}."
                )
            return

        deleted, batches = delete_in_batches(candidates, options["batch_size"], options["pause"], using)
        self.stdout.write(f"Deleted {deleted} event(s) {what} in {batches} batch(es).")
        if options["dead_letters"] and cutoff is not None:
            dead_qs = DeadLetter.objects.using(using).filter(created_at__lt=cutoff)
            dead, _ = delete_in_batches(dead_qs, options["batch_size"], options["pause"], using)
            self.stdout.write(f"Deleted {dead} dead letter(s).")

    def cutoff(self, older_than: str | None, keep: int | None) -> datetime | None:
        """Events with a timestamp before this go; ``None``: no age condition (``--keep`` alone)."""
        if older_than is not None:
            try:
                age = parse_duration(older_than)
            except ValueError as exc:
                raise CommandError(f"--older-than: {exc}.") from exc
        elif keep is not None:
            return None
        else:
            if conf.RETENTION <= 0:
                raise CommandError(
                    f"EVENTBUS['RETENTION'] is {conf.RETENTION}: give --older-than or --keep explicitly."
                )
            age = timedelta(seconds=conf.RETENTION)
        return timezone.now() - age

    @staticmethod
    def keep_bound(events: QuerySet[StoredEvent], keep: int) -> int:
        """The highest log id that ``--keep N`` lets go: the newest row that is not among the newest N."""
        beyond = events.order_by("-id").values_list("id", flat=True)[keep : keep + 1]
        return next(iter(beyond), 0)  # fewer than N events: 0, nothing goes

    def protect_cursors(self, candidates: QuerySet[StoredEvent], force: bool) -> QuerySet[StoredEvent]:
        """Leave out rows above the lowest durable cursor (not handled by every consumer yet)."""
        cursors = list(
            ConsumerCursor.objects.using(candidates.db).order_by("position").values_list("name", "position")
        )
        if not cursors:
            return candidates
        lowest = cursors[0][1]
        first_held = candidates.filter(id__gt=lowest).order_by("id").values_list("id", flat=True).first()
        if first_held is None:
            return candidates  # the cursors hold nothing back
        behind = ", ".join(name for name, position in cursors if position < first_held)
        if force:
            self.stderr.write(
                f"--force: deleting events that durable consumer(s) {behind} have not handled; "
                "they will never see them."
            )
            return candidates
        self.stderr.write(
            f"Keeping events after log id {lowest}: durable consumer(s) {behind} have not handled "
            "them yet (--force deletes them anyway)."
        )
        return candidates.filter(id__lte=lowest)

    @staticmethod
    def describe(cutoff: datetime | None, keep: int | None) -> str:
        parts = []
        if cutoff is not None:
            parts.append(f"older than {cutoff:%Y-%m-%d %H:%M:%S%z}")
        if keep is not None:
            parts.append(f"beyond the newest {keep}")
        return " and ".join(parts)


def delete_in_batches(queryset: QuerySet[Any], batch_size: int, pause: float, using: str) -> tuple[int, int]:
    """Delete ``queryset`` ``batch_size`` rows at a time, lowest ids first; returns (rows, batches).

    Each batch fetches the next ids (an index range scan) and deletes by that id
    range, in its own transaction: locks are held for one batch only and the
    work done so far stays done if the command is interrupted.
    """
    deleted = batches = 0
    after = 0
    queryset = queryset.order_by("pk")
    while True:
        ids = list(queryset.filter(pk__gt=after).values_list("pk", flat=True)[:batch_size])
        if not ids:
            return deleted, batches
        with transaction.atomic(using=using):
            # Bounded by the fetched range *and* the same conditions: a row inserted meanwhile
            # inside the range is only deleted if it would have been selected anyway.
            count, _ = queryset.filter(pk__gte=ids[0], pk__lte=ids[-1]).delete()
        deleted += count
        batches += 1
        after = ids[-1]
        if pause:
            time.sleep(pause)
