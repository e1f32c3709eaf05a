"""Every misconfiguration is a system check error with a stable id and a hint."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from django_eventbus.checks import check_deploy, check_settings


def ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


def run(**eventbus: Any) -> list[Any]:
    with override_settings(EVENTBUS=eventbus):
        return check_settings()


def test_valid_settings_pass() -> None:
    assert run(BUS="memory://", MODELS={"inventory.Product": {"fields": ["name", "price"]}}) == []
    assert run() == []


def test_eventbus_must_be_a_dict() -> None:
    with override_settings(EVENTBUS="memory://"):
        assert ids(check_settings()) == ["django_eventbus.E001"]


def test_unknown_key() -> None:
    [error] = run(BUSS="memory://")
    assert error.id == "django_eventbus.E002" and "BUSS" in error.msg and "BUS" in error.hint


@pytest.mark.parametrize(
    "bus, fragment",
    [
        ({"backend": "kafka"}, "'memory', 'postgres', 'redis'"),
        ("kafka://localhost", "unknown event bus URL scheme"),
        ({"host": "x"}, "no 'backend'"),
        ({"backend": "no_such.module.Bus"}, "cannot import"),
    ],
)
def test_bad_backend(bus: Any, fragment: str) -> None:
    errors = run(BUS=bus)
    assert len(errors) == 1 and errors[0].id in {"django_eventbus.E003", "django_eventbus.E004"}
    assert fragment in errors[0].msg


def test_backend_package_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)
    [error] = run(BUS="redis://localhost:6379/0")
    assert error.id == "django_eventbus.E004"
    assert "pip install 'django-eventbus[redis]'" in error.msg


def test_postgres_bus_without_connection_string_needs_a_postgres_database(settings: Any) -> None:
    from django.db import connection

    errors = run(BUS={"backend": "postgres"})
    if connection.vendor == "postgresql":
        assert errors == []
    else:
        assert ids(errors) == ["django_eventbus.E005"]
    assert ids(run(BUS={"backend": "postgres"}, DATABASE_ALIAS="nope")) == ["django_eventbus.E005"]


def test_model_label_that_does_not_resolve() -> None:
    [error] = run(MODELS={"inventory.Nope": {}})
    assert error.id == "django_eventbus.E007" and "'inventory.nope'" in error.msg
    assert "app_label.ModelName" in error.hint


def test_unknown_model_option_field_and_event() -> None:
    errors = run(
        MODELS={
            "inventory.Product": {
                "fields": ["name", "colour"],
                "exclude": ["nope"],
                "events": ["created", "saved"],
                "topics": "x",
            }
        }
    )
    assert sorted(ids(errors)) == [
        "django_eventbus.E008",
        "django_eventbus.E009",
        "django_eventbus.E009",
        "django_eventbus.E010",
    ]
    text = " ".join(e.msg + (e.hint or "") for e in errors)
    assert "'colour'" in text and "'nope'" in text and "'saved'" in text and "topics" in text
    assert "price" in text  # the hint lists the model's fields


def test_topic_must_be_a_string() -> None:
    assert ids(run(CAPTURE="signals", MODELS={"inventory.Product": {"topic": ""}})) == [
        "django_eventbus.E011"
    ]


@pytest.mark.django_db  # Django 6's check command also runs the database checks
def test_manage_py_check_fails_on_bad_settings() -> None:
    with (
        override_settings(EVENTBUS={"BUS": {"backend": "kafka"}}),
        pytest.raises(SystemCheckError, match="E003"),
    ):
        call_command("check")


def test_deploy_warns_about_the_memory_bus_in_production() -> None:
    with override_settings(EVENTBUS={"BUS": "memory://"}, DEBUG=False):
        assert ids(check_deploy()) == ["django_eventbus.W001"]
    with override_settings(EVENTBUS={"BUS": "redis://localhost"}, DEBUG=False):
        assert check_deploy() == []


def test_capture_auto_is_database_capture_on_postgresql_with_the_log(settings: Any) -> None:
    from django.db import connection

    from django_eventbus.conf import conf

    settings.EVENTBUS = {k: v for k, v in settings.EVENTBUS.items() if k != "CAPTURE"}  # the default
    expected = "database" if connection.vendor == "postgresql" else "signals"
    resolved = conf.CAPTURE
    assert conf.get("CAPTURE") == "auto" and resolved == expected
    settings.EVENTBUS = {**settings.EVENTBUS, "STORE_EVENTS": False}
    assert conf.CAPTURE == "signals"  # triggers write the log: no log, no database capture
    settings.EVENTBUS = {**settings.EVENTBUS, "STORE_EVENTS": True, "CAPTURE": "signals"}
    assert conf.CAPTURE == "signals"
