"""System checks: every misconfiguration of ``EVENTBUS`` is an error that says how to fix it.

Ids are stable (``django_eventbus.E001``…) so they can be silenced or searched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.db import router
from django.db.models import Model

from .conf import DEFAULTS, MODEL_DEFAULTS, conf
from .events.bus import parse_bus_url, resolve_backend

__all__ = ["check_settings"]

DOCS = "see the django-eventbus README, section Settings"


@register(Tags.compatibility)
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    raw = conf.declared
    if not isinstance(raw, Mapping):
        return [
            Error(
                f"EVENTBUS must be a dict, not {type(raw).__name__}.",
                hint='Use EVENTBUS = {"BUS": "memory://", "MODELS": {...}}; ' + DOCS,
                id="django_eventbus.E001",
            )
        ]
    errors: list[CheckMessage] = []
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        errors.append(
            Error(
                f"EVENTBUS has unknown keys: {', '.join(unknown)}.",
                hint=f"Valid keys are {', '.join(sorted(DEFAULTS))}; {DOCS}.",
                id="django_eventbus.E002",
            )
        )
    errors += _check_bus()
    errors += _check_models()
    errors += _check_capture()
    errors += _check_streams()
    errors += _check_partitions()
    return errors


def _check_partitions() -> list[CheckMessage]:
    value = conf.get("PARTITIONS_PER_LISTENER")
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return []
    return [
        Error(
            f"EVENTBUS['PARTITIONS_PER_LISTENER'] is {value!r}, not None or an integer >= 1.",
            hint="Leave it out (None: each listener takes a fair share of a partitioned "
            "consumer's partitions) or set a cap such as 2; see docs/consumers.md.",
            id="django_eventbus.E018",
        )
    ]


def _check_bus() -> list[CheckMessage]:
    bus = conf.BUS
    try:
        config = parse_bus_url(bus) if isinstance(bus, str) else dict(bus)
    except (ValueError, TypeError) as exc:
        return [Error(f"EVENTBUS['BUS'] is invalid: {exc}", hint=DOCS, id="django_eventbus.E003")]
    name = config.get("backend")
    if not name:
        return [
            Error(
                "EVENTBUS['BUS'] has no 'backend'.",
                hint='Use "memory://", "redis://host:6379/0", "postgres://…" or {"backend": "memory"}.',
                id="django_eventbus.E003",
            )
        ]
    try:
        resolve_backend(str(name))
    except ImportError as exc:
        return [Error(str(exc), hint="Install the extra named above.", id="django_eventbus.E004")]
    except ValueError as exc:
        return [Error(str(exc), hint=DOCS, id="django_eventbus.E003")]
    if name == "postgres" and not config.get("connection_string"):
        alias = conf.DATABASE_ALIAS
        from django.db import connections

        if alias not in connections.settings or connections[alias].vendor != "postgresql":
            return [
                Error(
                    f"The postgres event bus has no connection_string and DATABASES[{alias!r}] "
                    "is not PostgreSQL.",
                    hint="Set EVENTBUS['BUS']['connection_string'] or EVENTBUS['DATABASE_ALIAS'] "
                    "to a PostgreSQL database.",
                    id="django_eventbus.E005",
                )
            ]
    return []


def _check_models() -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    models_setting: object = conf.MODELS
    if not isinstance(models_setting, Mapping):
        return [
            Error(
                "EVENTBUS['MODELS'] must be a dict of 'app_label.ModelName': {options}.",
                id="django_eventbus.E006",
            )
        ]
    from .capture.tracking import EVENT_NAMES, configured_models

    for label, options in configured_models().items():
        try:
            model = apps.get_model(label)
        except (LookupError, ValueError):
            errors.append(
                Error(
                    f"EVENTBUS['MODELS'] names {label!r}, which is not an installed model.",
                    hint="Use 'app_label.ModelName' of a model in INSTALLED_APPS (e.g. 'auth.User').",
                    id="django_eventbus.E007",
                )
            )
            continue
        unknown_options = sorted(set(options) - set(MODEL_DEFAULTS))
        if unknown_options:
            errors.append(
                Error(
                    f"EVENTBUS['MODELS'][{label!r}] has unknown options: {', '.join(unknown_options)}.",
                    hint=f"Valid options are {', '.join(MODEL_DEFAULTS)}.",
                    id="django_eventbus.E008",
                )
            )
        fields = [*model._meta.concrete_fields, *model._meta.many_to_many]
        names = {f.name for f in fields} | {f.attname for f in fields}
        for key in ("fields", "exclude"):
            for field_name in options.get(key) or ():
                if field_name not in names:
                    errors.append(
                        Error(
                            f"EVENTBUS['MODELS'][{label!r}][{key!r}] names {field_name!r}, "
                            f"which is not a concrete or many-to-many field of {model._meta.label}.",
                            hint=f"Fields of {model._meta.label}: "
                            + ", ".join(sorted(f.name for f in fields)),
                            id="django_eventbus.E009",
                        )
                    )
        for event_name in options.get("events") or ():
            if event_name not in EVENT_NAMES:
                errors.append(
                    Error(
                        f"EVENTBUS['MODELS'][{label!r}]['events'] has {event_name!r}.",
                        hint="Model events are 'created', 'updated' and 'deleted'.",
                        id="django_eventbus.E010",
                    )
                )
        topic = options.get("topic")
        if topic is not None and (not isinstance(topic, str) or not topic):
            errors.append(
                Error(
                    f"EVENTBUS['MODELS'][{label!r}]['topic'] must be a non-empty string.",
                    id="django_eventbus.E011",
                )
            )
        errors += _check_write_database(model)
    return errors


def _check_write_database(model: type[Model]) -> list[CheckMessage]:
    # The log row must share the tracked row's transaction, so both need one database;
    # at runtime such a write is refused before it happens (tracking.require_log_database).
    alias = conf.DATABASE_ALIAS
    using = router.db_for_write(model)
    if using == alias:
        return []
    return [
        Error(
            f"{model._meta.label} is tracked, but the database router sends its writes to {using!r} "
            f"while the event log is on {alias!r} (EVENTBUS['DATABASE_ALIAS']): its events could not "
            "be written in the same transaction as the change, so those writes are refused.",
            hint=f"Route {model._meta.label}'s writes to {alias!r}, set EVENTBUS['DATABASE_ALIAS'] to "
            f"{using!r} if all tracked models live there, or stop tracking {model._meta.label}.",
            id="django_eventbus.E012",
        )
    ]


def _check_streams() -> list[CheckMessage]:
    url = conf.get("STREAMS")
    problem = None
    if url is not None:
        from .delivery.streams import parse_target

        try:
            parse_target(str(url))
        except ValueError as exc:
            problem = f"EVENTBUS['STREAMS'] is not a stream target: {exc}."
    try:
        idle_ok = float(conf.get("STREAM_CLAIM_IDLE")) > 0
    except (TypeError, ValueError):
        idle_ok = False
    if not idle_ok:
        problem = f"EVENTBUS['STREAM_CLAIM_IDLE'] is {conf.get('STREAM_CLAIM_IDLE')!r}, not seconds > 0."
    if problem is None:
        return []
    return [
        Error(
            problem,
            hint='Use e.g. "redis-streams://127.0.0.1:6379/0?partitions=4&maxlen=100000" and a '
            "STREAM_CLAIM_IDLE of a few seconds or more; see docs/streams.md.",
            id="django_eventbus.E017",
        )
    ]


def _check_capture() -> list[CheckMessage]:
    raw = conf.get("CAPTURE")
    if raw not in ("auto", "signals", "database"):
        return [
            Error(
                f"EVENTBUS['CAPTURE'] is {raw!r}.",
                hint='Use "auto" (the default: database capture on PostgreSQL), "signals" (any '
                'database) or "database" (PostgreSQL triggers).',
                id="django_eventbus.E016",
            )
        ]
    if conf.CAPTURE != "database":
        return []
    from django.db import connections

    alias = conf.DATABASE_ALIAS
    if alias not in connections.settings or connections[alias].vendor != "postgresql":
        return [
            Error(
                f"EVENTBUS['CAPTURE'] = 'database' needs PostgreSQL, and DATABASES[{alias!r}] is not.",
                hint="Use CAPTURE 'signals' on this database, or set EVENTBUS['DATABASE_ALIAS'] to a "
                "PostgreSQL database that holds the tracked tables.",
                id="django_eventbus.E013",
            )
        ]
    from .capture.tracking import tracked_models
    from .capture.triggers import capturable_problem

    messages: list[CheckMessage] = [
        Error(
            f"Database capture cannot track {tracking.model._meta.label}: {problem}.",
            hint="Track the parent model, or use CAPTURE 'signals'.",
            id="django_eventbus.E014",
        )
        for tracking in tracked_models()
        if (problem := capturable_problem(tracking)) is not None
    ]
    return messages


@register(Tags.database)
def check_capture_triggers(
    app_configs: Sequence[AppConfig] | None = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Database capture: every tracked model's trigger installed and current (E015).

    A database check, so it runs with ``check --database default`` and when
    ``eventbus_listen`` starts — not during ``migrate``, whose post_migrate step
    installs the triggers (failing migrate for what it is about to fix would
    leave no way forward but the command).
    """
    alias = conf.DATABASE_ALIAS
    if not databases or alias not in databases or _running_migrate():
        return []
    from django.db import connections

    if alias not in connections.settings or connections[alias].vendor != "postgresql":
        return []  # E013, when database capture is asked for
    from .capture.triggers import LOG_TABLE, problems

    if LOG_TABLE not in connections[alias].introspection.table_names():
        return []  # not migrated yet: migrate installs the triggers
    return [
        Error(
            f"The database capture trigger of {label} is {state}"
            + (
                " (its model is no longer captured by the database, so it would log twice)."
                if state == "not tracked"
                else "."
            ),
            hint=f"Run: manage.py eventbus_triggers install --database {alias}",
            id="django_eventbus.E015",
        )
        for label, state in problems(alias)
    ]


def _running_migrate() -> bool:
    # migrate runs the database checks before it migrates; post_migrate then fixes the triggers.
    import inspect

    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_globals.get("__name__") == "django.core.management.commands.migrate":
            return True
        frame = frame.f_back
    return False


@register(Tags.compatibility, deploy=True)
def check_deploy(
    app_configs: Sequence[AppConfig] | None = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    warnings: list[CheckMessage] = []
    try:
        backend = conf.raw_bus_config().get("backend")
    except (ValueError, TypeError):
        return []
    if backend == "memory" and not settings.DEBUG:
        warnings.append(
            Warning(
                "The memory event bus delivers only inside one process: other processes "
                "(listeners, other web workers) get nothing.",
                hint="Use EVENTBUS['BUS'] = 'redis://…' or 'postgres://…' in production.",
                id="django_eventbus.W001",
            )
        )
    warnings += _check_channel_layer()
    warnings += _check_durable_without_log()
    return warnings


def _check_channel_layer() -> list[CheckMessage]:
    # Websocket delivery goes through the channel layer: without one, the websocket
    # consumer accepts subscriptions and then never receives an event.
    if not conf.get("CHANNELS") or not apps.is_installed("channels"):
        return []
    if getattr(settings, "CHANNEL_LAYERS", None):
        return []
    return [
        Warning(
            "Channels is installed and EVENTBUS['CHANNELS'] is on, but CHANNEL_LAYERS is not set: "
            "events are not forwarded to Channels groups, so websocket clients (and the admin's "
            '"Follow live") receive nothing.',
            hint="Set CHANNEL_LAYERS (e.g. channels_redis.pubsub.RedisPubSubChannelLayer), or set "
            "EVENTBUS['CHANNELS'] = False if you do not deliver events to websockets.",
            id="django_eventbus.W002",
        )
    ]


def _check_durable_without_log() -> list[CheckMessage]:
    if conf.STORE_EVENTS:
        return []
    from .delivery.consumers import get_consumers

    durable = sorted(c.name for c in get_consumers() if c.durable)
    if not durable:
        return []
    return [
        Warning(
            f"EVENTBUS['STORE_EVENTS'] is off, but durable consumers are registered ({', '.join(durable)}): "
            "without the event log they cannot catch up, so they lose every event published while "
            "they are down or reconnecting.",
            hint="Turn STORE_EVENTS on, or declare these consumers with @consumer(..., durable=False) "
            "if losing events is acceptable.",
            id="django_eventbus.W003",
        )
    ]


#: PgBouncer's default port. PostgreSQL answers on it only if someone chose to.
PGBOUNCER_PORT = "6432"


@register(Tags.compatibility)
def check_listen_through_pooler(
    app_configs: Sequence[AppConfig] | None = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Warn when the postgres bus would LISTEN through what looks like PgBouncer.

    In PgBouncer's transaction (or statement) pooling mode the server session that ran
    LISTEN goes back to the pool after the statement: the listener receives nothing, and
    says nothing. Only the port can be seen without connecting, so this is a hint.
    """
    try:
        config = conf.raw_bus_config()
    except (ValueError, TypeError):
        return []  # E003 reports it
    if config.get("backend") != "postgres":
        return []
    ports = _listen_ports(config)
    if PGBOUNCER_PORT not in ports:
        return []
    return [
        Warning(
            f"The postgres event bus LISTENs on port {PGBOUNCER_PORT}, PgBouncer's default. Through "
            "PgBouncer in transaction pooling mode LISTEN receives nothing, silently.",
            hint="Set EVENTBUS['BUS']['listen_connection_string'] (or ?listen_url= in the BUS URL) to "
            "PostgreSQL itself, bypassing the pooler; publishing and the event log may stay on PgBouncer. "
            "If port 6432 is PostgreSQL or PgBouncer in session mode, silence django_eventbus.W004 "
            "(docs/deployment.md, PgBouncer).",
            id="django_eventbus.W004",
        )
    ]


def _listen_ports(config: Mapping[str, Any]) -> set[str]:
    """The ports of the connection the postgres bus LISTENs on (libpq's defaults applied)."""
    conninfo = config.get("listen_connection_string") or config.get("connection_string")
    if conninfo:
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            return set()  # E004 reports it
        try:
            port = conninfo_to_dict(str(conninfo)).get("port")
        except Exception:  # an invalid string fails when the bus is built, with its own message
            return set()
    else:
        from django.db import connections

        alias = conf.DATABASE_ALIAS
        if alias not in connections.settings:
            return set()  # E005 reports it
        port = connections.settings[alias].get("PORT")
    # libpq: several hosts may have one port each ("6432,5432"); none means PGPORT, then 5432.
    text = str(port or os.environ.get("PGPORT") or "5432")
    return {piece.strip() for piece in text.split(",")}
