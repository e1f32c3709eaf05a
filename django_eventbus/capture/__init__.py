"""Capture: a model change becomes a logged event, in the writing transaction.

``tracking`` (which models emit; signal receivers) → ``payloads`` (values typed by
field) → ``outbox`` (log row now, publish on commit) → ``store`` (the INSERT).
``triggers`` and ``trigger_context`` are the same job done by PostgreSQL triggers
(``CAPTURE = "database"``); ``querysets`` covers bulk writes; ``publishing`` is
custom events; ``context`` and ``middleware`` carry the correlation id.
"""
