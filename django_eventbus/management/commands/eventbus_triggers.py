"""``manage.py eventbus_triggers install|uninstall|check``: the database capture triggers.

``migrate`` installs them too (post_migrate); this command is for a settings
change without a migrate, a database restored from elsewhere, and scripts.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections

from django_eventbus.capture.triggers import install, problems, uninstall
from django_eventbus.conf import conf

ACTIONS = ("install", "uninstall", "check")


class Command(BaseCommand):
    help = (
        "Database capture (EVENTBUS['CAPTURE'] = 'database'): install or update the PostgreSQL "
        "triggers of the tracked models (and remove those of models no longer tracked), remove "
        "them all, or check that they are current (exit status 1 if not)."
    )
    requires_system_checks: list[str] = []  # check must work while the triggers are outdated

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # A bad argument is one line on stderr, not the usage block before it.
        parser.print_usage = lambda file=None: None  # type: ignore[method-assign]
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", metavar="install|uninstall|check")
        parser.add_argument(
            "--database", default=None, help="database alias (default: EVENTBUS['DATABASE_ALIAS'])"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action not in ACTIONS:
            raise CommandError(f"unknown action {action!r}: use install, uninstall or check")
        alias = options["database"] or conf.DATABASE_ALIAS
        if alias not in connections.settings:
            raise CommandError(f"unknown database {alias!r}: use an alias of DATABASES")
        if connections[alias].vendor != "postgresql":
            raise CommandError(f"database {alias!r} is not PostgreSQL: database capture needs PostgreSQL")
        try:
            getattr(self, f"_{action}")(alias)
        except DatabaseError as exc:
            raise CommandError(f"{action} failed: {str(exc).strip().splitlines()[0]}") from exc

    def _install(self, alias: str) -> None:
        if conf.CAPTURE != "database":
            self.stdout.write("EVENTBUS['CAPTURE'] is not 'database': removing any capture triggers")
        report = install(alias)
        for label in report.installed:
            self.stdout.write(f"installed {label}")
        for label in report.current:
            self.stdout.write(f"current   {label}")
        for label in report.removed:
            self.stdout.write(f"removed   {label}")
        for reason in report.skipped:
            self.stderr.write(f"skipped   {reason}")
        if report.skipped:
            raise CommandError(f"{len(report.skipped)} model(s) have no table yet: run migrate first")

    def _uninstall(self, alias: str) -> None:
        for label in uninstall(alias).removed:
            self.stdout.write(f"removed   {label}")

    def _check(self, alias: str) -> None:
        found = problems(alias)
        for label, state in found:
            self.stdout.write(f"{state:<11} {label}")
        if found:
            raise CommandError(
                f"{len(found)} capture trigger(s) not as configured: run manage.py eventbus_triggers "
                f"install --database {alias}"
            )
        self.stdout.write("all capture triggers are current")
