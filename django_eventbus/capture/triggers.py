"""Database capture: PostgreSQL triggers write the event log rows (``EVENTBUS["CAPTURE"] = "database"``).

Every tracked model's table gets one trigger function and up to three triggers
(``AFTER INSERT``/``UPDATE``/``DELETE``, only for the model's ``events``). The
function INSERTs the log rows (``relay = true``: the listener's relay publishes
them) in the writing transaction, so every writer is captured — ORM saves,
``QuerySet.update()``, ``bulk_create``/``bulk_update``, deletes and cascades,
raw SQL, ``COPY``, other clients with no Django — and a rolled back transaction
or savepoint takes its log rows with it. ``TRUNCATE`` is not captured (no rows
are visible to a trigger); it is documented.

Statement-level triggers with transition tables, not row-level ones: one
``INSERT … SELECT`` per statement writes all its log rows, so a
``bulk_update`` of 10,000 rows runs one log statement instead of 10,000
trigger calls (figures in bench/README.md; a single-row save costs one trigger
call either way). Per-row events stay exact: one statement per UPDATE joins the
old and new transition tables (``FULL JOIN`` on the primary key), ``changed``
lists exactly the tracked columns whose value differs (``IS DISTINCT FROM``),
and a row whose tracked columns did not change emits nothing. A statement that
changes a primary key emits DELETED for the old key and CREATED for the new one,
which is what a projection keyed by pk needs. Under concurrent writers the row
lock orders two UPDATEs of one row, and the second one's trigger (so its log
id) runs after the first committed, so log order per row is commit order.

Written by hand rather than with django-pgtrigger (evaluated, 4.17): the set of
tracked models comes from ``EVENTBUS["MODELS"]``/``@track`` and is read live,
including third-party models such as ``auth.User`` that cannot get migrations in
their own app; pgtrigger registers triggers per model at import time and by
default writes them into the model's app's migrations. What we need of it is
small — a definition hash kept in ``COMMENT ON FUNCTION`` (pgtrigger keeps its
hash in the trigger's comment the same way), install on ``post_migrate``, an
install/uninstall/check command — and lives here. django-pghistory's context
passing is followed in :mod:`django_eventbus.capture.trigger_context`.

The SQL is built from model metadata and settings only (table, column, topic,
label), every identifier and literal quoted by :func:`ident` / :func:`literal`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db import connections, models, transaction

from django_eventbus.conf import conf
from django_eventbus.events import EventType

from .tracking import ModelTracking, tracked_models

__all__ = [
    "TriggerSet",
    "capturable_problem",
    "definitions",
    "install",
    "problems",
    "uninstall",
]

logger = logging.getLogger("django_eventbus")

# Bump when the generated SQL changes shape: every installed function then reads as outdated.
VERSION = "2"
MARK = "django_eventbus capture"
LOG_TABLE = "django_eventbus_event"
# Serializes concurrent installs (several deploy jobs running migrate at once).
LOCK_KEY = 0x6576656E74627573  # "eventbus"
OPERATIONS = {
    EventType.CREATED: ("INSERT", "ins", "NEW TABLE AS eventbus_new"),
    EventType.UPDATED: ("UPDATE", "upd", "OLD TABLE AS eventbus_old NEW TABLE AS eventbus_new"),
    EventType.DELETED: ("DELETE", "del", "OLD TABLE AS eventbus_old"),
}
# jsonb_build_object takes at most 100 arguments: wider models are built from chunks.
PAIRS_PER_CALL = 50

# Shared helpers: Python's isoformat()/duration_iso_string() spelled in SQL.
HELPERS = [
    """CREATE OR REPLACE FUNCTION eventbus_iso_datetime(value timestamptz, zone text, suffix text)
RETURNS text LANGUAGE sql STABLE AS $$
SELECT to_char(value AT TIME ZONE zone, 'YYYY-MM-DD"T"HH24:MI:SS')
    || CASE WHEN extract(microseconds FROM value)::bigint % 1000000 <> 0
            THEN to_char(value AT TIME ZONE zone, '.US') ELSE '' END
    || suffix
$$""",
    """CREATE OR REPLACE FUNCTION eventbus_iso_time(value time)
RETURNS text LANGUAGE sql STABLE AS $$
SELECT to_char(value::interval, 'HH24:MI:SS')
    || CASE WHEN extract(microseconds FROM value)::bigint % 1000000 <> 0
            THEN to_char(value::interval, '.US') ELSE '' END
$$""",
    """CREATE OR REPLACE FUNCTION eventbus_iso_micros(total bigint)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
SELECT CASE WHEN total < 0 THEN '-' ELSE '' END
    || 'P' || (abs(total) / 86400000000) || 'DT'
    || lpad((abs(total) % 86400000000 / 3600000000)::text, 2, '0') || 'H'
    || lpad((abs(total) % 3600000000 / 60000000)::text, 2, '0') || 'M'
    || lpad((abs(total) % 60000000 / 1000000)::text, 2, '0')
    || CASE WHEN abs(total) % 1000000 <> 0 THEN '.' || lpad((abs(total) % 1000000)::text, 6, '0') ELSE '' END
    || 'S'
$$""",
    """CREATE OR REPLACE FUNCTION eventbus_iso_duration(value interval)
RETURNS text LANGUAGE sql STABLE AS $$
SELECT eventbus_iso_micros((extract(epoch FROM value) * 1000000)::bigint)
$$""",
]
HELPER_NAMES = ["eventbus_iso_datetime", "eventbus_iso_time", "eventbus_iso_micros", "eventbus_iso_duration"]


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    """A quoted SQL string literal (standard_conforming_strings, on by default since PostgreSQL 9.1)."""
    if "\x00" in value:
        raise ValueError("PostgreSQL strings cannot contain NUL characters")
    return "'" + value.replace("'", "''") + "'"


def value_sql(field: models.Field[Any, Any], column: str) -> str:
    """SQL for a column's JSON value, as the Python codec writes the field's typed value."""
    if isinstance(field, models.ForeignKey):  # and OneToOneField: the target's pk, typed by the target
        return value_sql(field.target_field, column)
    kind = field.get_internal_type()
    if kind in ("DecimalField", "UUIDField"):
        # numeric::text keeps the column's scale ("7.00"); uuid::text is Python's str(UUID).
        return f"{column}::text"
    if kind == "DateTimeField":
        if settings.USE_TZ:
            return f"eventbus_iso_datetime({column}, 'UTC', '+00:00')"
        # Without USE_TZ Django reads naive values in the connection's time zone.
        return f"eventbus_iso_datetime({column}, {literal(str(settings.TIME_ZONE or 'UTC'))}, '')"
    if kind == "DateField":
        return f"to_char({column}, 'YYYY-MM-DD')"
    if kind == "TimeField":
        return f"eventbus_iso_time({column})"
    if kind == "DurationField":
        return f"eventbus_iso_duration({column})"
    if kind == "BinaryField":
        return f"translate(encode({column}, 'base64'), E'\\n', '')"
    if kind in ("FileField", "ImageField"):
        return f"NULLIF({column}, '')"
    if kind in ("GenericIPAddressField", "IPAddressField"):
        return f"host({column})"
    # Booleans, numbers, text and jsonb: jsonb_build_object converts them as the codec would;
    # custom fields travel as their stored database value.
    return column


def _object_sql(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return "'{}'::jsonb"
    chunks = [pairs[i : i + PAIRS_PER_CALL] for i in range(0, len(pairs), PAIRS_PER_CALL)]
    return " || ".join(
        "jsonb_build_object(" + ", ".join(f"{literal(k)}, {v}" for k, v in chunk) + ")" for chunk in chunks
    )


def capturable_problem(tracking: ModelTracking) -> str | None:
    """Why a trigger on the model's table cannot see every tracked field, or ``None``."""
    meta = tracking.model._meta
    pk = meta.pk
    if pk is None or getattr(pk, "column", None) is None:
        return f"{meta.label} has no single-column primary key"
    foreign = [f.name for f in [*tracking.fields, pk] if f.model._meta.db_table != meta.db_table]
    if foreign:
        return (
            f"{meta.label} inherits fields stored in another table ({', '.join(sorted(set(foreign)))}); "
            "a trigger sees only its own table"
        )
    return None


@dataclasses.dataclass(frozen=True)
class TriggerSet:
    """The function and triggers that capture one tracked model."""

    label: str
    table: str
    function: str
    triggers: dict[str, str]  # trigger name -> "INSERT" / "UPDATE" / "DELETE"
    function_sql: str
    trigger_sql: list[str]
    digest: str

    @property
    def comment(self) -> str:
        return f"{MARK} {self.label} {self.digest}"


def _names(label: str) -> str:
    # Identifiers are cut at 63 bytes: a readable prefix plus a digest of the label stays unique.
    readable = re.sub(r"[^a-z0-9_]", "_", label.lower())[:40]
    return f"eventbus_{readable}_{hashlib.sha256(label.encode()).hexdigest()[:8]}"


def definition(tracking: ModelTracking) -> TriggerSet:
    """The SQL that captures ``tracking``'s model (pure: no database access)."""
    meta = tracking.model._meta
    assert meta.pk is not None  # capturable_problem() rules out the rest
    label = meta.label_lower
    base = _names(label)
    function = base + "_capture"
    table = meta.db_table
    pk_field = meta.pk

    def col(alias: str, field: models.Field[Any, Any]) -> str:
        return f"{alias}.{ident(str(field.column))}"  # concrete fields have a column

    def payload(alias: str, extra: list[tuple[str, str]]) -> str:
        fields = _object_sql([(f.name, value_sql(f, col(alias, f))) for f in tracking.fields])
        pairs = [
            ("model", literal(label)),
            ("pk", value_sql(pk_field, col(alias, pk_field))),
            ("fields", fields),
            *extra,
        ]
        return "jsonb_build_object(" + ", ".join(f"{literal(k)}, {v}" for k, v in pairs) + ")"

    def insert(type_sql: str, payload_sql: str, body: str) -> str:
        return (
            f"INSERT INTO {ident(LOG_TABLE)} (event_id, type, topic, payload, timestamp, source, "
            "correlation_id, metadata, relay)\n"
            f"    SELECT gen_random_uuid()::text, {type_sql}, {literal(tracking.topic)}, "
            f"{payload_sql}, clock_timestamp(), eventbus_source, eventbus_correlation, '{{}}'::jsonb, true\n"
            f"    {body};"
        )

    pk_join = f"{col('o', pk_field)} = {col('n', pk_field)}"
    created, deleted = literal(EventType.CREATED.value), literal(EventType.DELETED.value)
    branches = []
    if EventType.CREATED in tracking.events:
        branches.append(("INSERT", insert(created, payload("n", []), "FROM eventbus_new AS n")))
    if EventType.UPDATED in tracking.events:
        # One statement for the whole UPDATE: a key in both versions is an update (logged if a
        # tracked column differs); a key only in the old rows or only in the new ones is a
        # changed primary key, logged as DELETED of the old and CREATED of the new.
        old_pk, new_pk = col("o", pk_field), col("n", pk_field)
        differs = [f"{col('o', f)} IS DISTINCT FROM {col('n', f)}" for f in tracking.fields]
        changed = " || ".join(
            f"CASE WHEN {d} THEN jsonb_build_object({literal(f.name)}, jsonb_build_array("
            f"{value_sql(f, col('o', f))}, {value_sql(f, col('n', f))})) ELSE '{{}}'::jsonb END"
            for f, d in zip(tracking.fields, differs, strict=True)
        )
        updated = payload("n", [("changed", changed)] if changed and tracking.track_changes else [])
        wanted_rows = []
        if differs:
            wanted_rows.append(
                f"({old_pk} IS NOT NULL AND {new_pk} IS NOT NULL AND ({' OR '.join(differs)}))"
            )
        if EventType.DELETED in tracking.events:
            wanted_rows.append(f"{new_pk} IS NULL")
        if EventType.CREATED in tracking.events:
            wanted_rows.append(f"{old_pk} IS NULL")
        statement = insert(
            f"CASE WHEN {new_pk} IS NULL THEN {deleted} WHEN {old_pk} IS NULL THEN {created} "
            f"ELSE {literal(EventType.UPDATED.value)} END",
            f"CASE WHEN {new_pk} IS NULL THEN {payload('o', [])} WHEN {old_pk} IS NULL THEN "
            f"{payload('n', [])} ELSE {updated} END",
            f"FROM eventbus_old AS o FULL JOIN eventbus_new AS n ON {pk_join}\n"
            f"    WHERE {' OR '.join(wanted_rows)}",
        )
        branches.append(("UPDATE", statement if wanted_rows else "NULL;"))
    if EventType.DELETED in tracking.events:
        branches.append(("DELETE", insert(deleted, payload("o", []), "FROM eventbus_old AS o")))
    body_lines = [
        "DECLARE",
        "  eventbus_correlation text := NULLIF(current_setting('eventbus.correlation_id', true), '');",
        # Writes outside eventbus.correlation() (another client, psql, a cron job) are named by
        # their application_name, else by the server process that wrote them.
        "  eventbus_source text := COALESCE(NULLIF(current_setting('eventbus.source', true), ''),",
        "    NULLIF(current_setting('application_name', true), ''), 'postgresql:' || pg_backend_pid());",
        "BEGIN",
    ]
    for i, (op, sql) in enumerate(branches):
        body_lines.append(f"  {'IF' if i == 0 else 'ELSIF'} TG_OP = {literal(op)} THEN")
        body_lines.append("    " + sql)
    if branches:
        body_lines.append("  END IF;")
    body_lines += ["  RETURN NULL;", "END"]
    body = "\n".join(body_lines)
    tag = "$eventbus$"
    while tag in body:  # a topic or label that contains the dollar-quote tag
        tag = tag[:-1] + "_$"
    function_sql = (
        f"CREATE OR REPLACE FUNCTION {ident(function)}() RETURNS trigger LANGUAGE plpgsql AS {tag}\n"
        f"{body}\n{tag}"
    )
    triggers = {}
    trigger_sql = []
    for type_, (op, suffix, referencing) in OPERATIONS.items():
        if type_ not in tracking.events:
            continue
        name = f"{base}_{suffix}"
        triggers[name] = op
        trigger_sql.append(
            f"CREATE TRIGGER {ident(name)} AFTER {op} ON {ident(table)} REFERENCING {referencing} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {ident(function)}()"
        )
    digest = hashlib.sha256("\n".join([VERSION, *HELPERS, function_sql, *trigger_sql]).encode()).hexdigest()[
        :16
    ]
    return TriggerSet(label, table, function, triggers, function_sql, trigger_sql, digest)


def definitions() -> list[TriggerSet]:
    """What ``CAPTURE = "database"`` needs installed now (nothing under signal capture)."""
    if conf.CAPTURE != "database":
        return []
    return [definition(t) for t in tracked_models() if capturable_problem(t) is None]


@dataclasses.dataclass(frozen=True)
class _Installed:
    function: str
    comment: str
    triggers: dict[str, tuple[str, bool]]  # trigger name -> (table, enabled)


def _installed(cursor: Any) -> dict[str, _Installed]:
    """function name -> what is installed, for every capture function of ours in the schema."""
    cursor.execute(
        "SELECT p.oid, p.proname, obj_description(p.oid, 'pg_proc') FROM pg_proc p "
        "WHERE p.pronamespace = current_schema()::regnamespace "
        "AND obj_description(p.oid, 'pg_proc') LIKE %s",
        [MARK + " %"],
    )
    functions = {oid: _Installed(name, comment, {}) for oid, name, comment in cursor.fetchall()}
    if functions:
        cursor.execute(
            "SELECT t.tgfoid, t.tgname, c.relname, t.tgenabled <> 'D' FROM pg_trigger t "
            "JOIN pg_class c ON c.oid = t.tgrelid WHERE t.tgfoid = ANY(%s::oid[]) AND NOT t.tgisinternal",
            [list(functions)],
        )
        for oid, name, table, enabled in cursor.fetchall():
            functions[oid].triggers[name] = (table, enabled)
    return {f.function: f for f in functions.values()}


def _state(wanted: TriggerSet, installed: _Installed | None) -> str:
    if installed is None:
        return "missing"
    expected = dict.fromkeys(wanted.triggers, (wanted.table, True))
    if installed.comment != wanted.comment or installed.triggers != expected:
        return "outdated"
    return "current"


def _helpers_installed(cursor: Any) -> bool:
    cursor.execute(
        "SELECT EXISTS (SELECT FROM pg_proc WHERE proname = ANY(%s) "
        "AND pronamespace = current_schema()::regnamespace)",
        [HELPER_NAMES],
    )
    return bool(cursor.fetchone()[0])


def _table_exists(cursor: Any, table: str) -> bool:
    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [ident(table)])
    return bool(cursor.fetchone()[0])


def problems(using: str | None = None) -> list[tuple[str, str]]:
    """(label, "missing"/"outdated"/"not tracked") for every capture trigger that is not as configured."""
    connection = connections[using or conf.DATABASE_ALIAS]
    wanted = definitions()
    with connection.cursor() as cursor:
        installed = _installed(cursor)
    found = [(w.label, _state(w, installed.get(w.function))) for w in wanted]
    names = {w.function for w in wanted}
    stale = [(i.comment.split(" ")[2], "not tracked") for i in installed.values() if i.function not in names]
    return [(label, state) for label, state in found if state != "current"] + stale


@dataclasses.dataclass
class InstallReport:
    installed: list[str] = dataclasses.field(default_factory=list)
    current: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)  # label: why


def install(using: str | None = None, *, wanted: Iterable[TriggerSet] | None = None) -> InstallReport:
    """Make the installed capture triggers match the settings: create, replace, remove.

    Under signal capture this removes every capture trigger (the same as :func:`uninstall`),
    so switching back to signals never leaves a model captured twice.
    """
    alias = using or conf.DATABASE_ALIAS
    connection = connections[alias]
    wanted = list(definitions() if wanted is None else wanted)
    report = InstallReport()
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK_KEY])
        installed = _installed(cursor)
        if wanted:
            for helper in HELPERS:
                cursor.execute(helper)
        for trigger_set in wanted:
            if _state(trigger_set, installed.get(trigger_set.function)) == "current":
                report.current.append(trigger_set.label)
                continue
            if not _table_exists(cursor, trigger_set.table):
                # Its app is not migrated (yet): the check reports it as missing meanwhile.
                report.skipped.append(f"{trigger_set.label}: table {trigger_set.table} does not exist")
                continue
            old = installed.get(trigger_set.function)
            for name, (table, _enabled) in (old.triggers if old else {}).items():
                cursor.execute(f"DROP TRIGGER IF EXISTS {ident(name)} ON {ident(table)}")
            cursor.execute(trigger_set.function_sql)
            for name in trigger_set.triggers:
                cursor.execute(f"DROP TRIGGER IF EXISTS {ident(name)} ON {ident(trigger_set.table)}")
            for statement in trigger_set.trigger_sql:
                cursor.execute(statement)
            cursor.execute(
                f"COMMENT ON FUNCTION {ident(trigger_set.function)}() IS {literal(trigger_set.comment)}"
            )
            report.installed.append(trigger_set.label)
        names = {w.function for w in wanted}
        for function, old in installed.items():
            if function not in names:
                # CASCADE drops the function's triggers with it.
                cursor.execute(f"DROP FUNCTION {ident(function)}() CASCADE")
                report.removed.append(old.comment.split(" ")[2])
        if not wanted and _helpers_installed(cursor):
            # Checked first: post_migrate runs this after every flush, and DDL there is not free.
            for name in HELPER_NAMES:
                cursor.execute(f"DROP FUNCTION IF EXISTS {ident(name)} CASCADE")
    return report


def uninstall(using: str | None = None) -> InstallReport:
    """Remove every capture trigger and function of ours (whatever the settings say)."""
    return install(using, wanted=[])


def on_post_migrate(using: str, **kwargs: Any) -> None:
    """Keep the triggers current after every ``migrate`` of the event log's database."""
    if using != conf.DATABASE_ALIAS:
        return
    connection = connections[using]
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        if not _table_exists(cursor, LOG_TABLE):
            return  # migrate stopped before django_eventbus's tables
    report = install(using)
    for label in report.installed:
        logger.info("database capture: installed the trigger of %s", label)
    for label in report.removed:
        logger.info("database capture: removed the trigger of %s", label)
    for reason in report.skipped:
        logger.warning("database capture: no trigger for %s", reason)
