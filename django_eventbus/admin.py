"""The event log in the Django admin: read-only, newest first, fast on a log of millions of rows.

What makes it fast (measured in ``bench/bench_admin.py``):

* no ``COUNT(*)`` over the table: :class:`EventLogPaginator` counts at most
  ``count_limit`` rows and, past that, shows PostgreSQL's own estimate of the
  table size (``pg_class.reltuples``) for the unfiltered list and "more than
  N" for a filtered one; ``show_full_result_count`` and facets are off;
* every filter is an equality on an indexed column, combined with the
  ``ORDER BY id DESC`` of the list (indexes ``(type, id)``, ``(topic, id)``,
  ``(source, id)``), or a recent date range; there is no ``date_hierarchy``
  (it scans the table for its distinct years and months);
* the topic and source filters offer the most frequent values among the
  latest ``top_values_window`` rows instead of a ``DISTINCT`` over the table;
* no column is sortable (a sort by topic would sort the whole table);
* search is exact on the event id and the correlation id, then a prefix match
  on the topic (never ``UPPER(...) LIKE '%…%'``, which no index serves).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.views.main import ChangeList
from django.core.paginator import Paginator
from django.db import connections, models
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.formats import number_format
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.safestring import SafeString
from django.utils.timezone import localtime

from .conf import conf
from .events import Event
from .events.base import BaseEventBus
from .metrics import estimated_rows
from .models import ConsumerCursor, DeadLetter, StoredEvent

__all__ = ["ConsumerCursorAdmin", "DeadLetterAdmin", "EventLogPaginator", "StoredEventAdmin"]

logger = logging.getLogger("django_eventbus")

if TYPE_CHECKING:
    # django-stubs makes ModelAdmin generic; at runtime it is not subscriptable.
    StoredEventAdminBase = admin.ModelAdmin[StoredEvent]
    DeadLetterAdminBase = admin.ModelAdmin[DeadLetter]
    CursorAdminBase = admin.ModelAdmin[ConsumerCursor]
    PaginatorBase = Paginator[Any]
else:
    StoredEventAdminBase = DeadLetterAdminBase = CursorAdminBase = admin.ModelAdmin
    PaginatorBase = Paginator

#: Events re-published per round trip to the transport.
REPUBLISH_BATCH = 500


def pretty_json(value: Any) -> SafeString:
    """``value`` as indented JSON in a ``<pre>``, HTML-escaped (payloads are user data)."""
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    return format_html('<pre class="eventbus-json">{}</pre>', text)


def short_json(value: Any, length: int = 80) -> str:
    """One line of JSON, cut at ``length`` characters (escaped by the admin on output).

    With the spaces after ``,`` and ``:`` kept: they are where the column may wrap.
    """
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= length else text[: length - 1] + "…"


def format_time(value: datetime) -> str:
    """``YYYY-MM-DD HH:MM:SS.mmm`` in the current time zone."""
    return localtime(value).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if settings.USE_TZ else str(value)[:23]


class EventLogPaginator(PaginatorBase):
    """A paginator that never counts more than ``count_limit`` rows.

    ``COUNT(*)`` on PostgreSQL reads the whole table (or index): on a log of
    millions of rows it costs far more than showing the page. Up to the limit
    the count is exact; past it, the unfiltered list shows the planner's
    estimate (``estimated``) and a filtered one the limit (``capped``).
    """

    count_limit = 10_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.estimated = False
        self.capped = False

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if not isinstance(queryset, QuerySet):
            return len(queryset)
        # The ordering is irrelevant to a count: dropping it lets the planner pick the cheapest index.
        counted = queryset.order_by()[: self.count_limit + 1].count()
        if counted <= self.count_limit:
            return counted
        if not queryset.query.has_filters():
            estimate = estimated_rows(queryset.model, queryset.db)
            if estimate is not None and estimate > self.count_limit:
                self.estimated = True
                return estimate
        self.capped = True
        return counted

    @property
    def count_display(self) -> str:
        """The count as the templates show it: "about 1,000,000", "more than 10,000" or "42"."""
        count = self.count
        if self.estimated:
            return f"about {number_format(count, force_grouping=True)}"
        if self.capped:
            return f"more than {number_format(self.count_limit, force_grouping=True)}"
        return number_format(count, force_grouping=True)


def top_values(field: str, window: int, limit: int, using: str) -> list[str]:
    """The ``limit`` most frequent values of ``field`` among the latest ``window`` log rows.

    Reads at most ``window`` rows through the primary key index, whatever the
    size of the log (a ``DISTINCT`` over the table would read all of it).
    """
    connection = connections[using]
    qn = connection.ops.quote_name
    model_field = StoredEvent._meta.get_field(field)
    assert isinstance(model_field, models.Field) and model_field.column
    table, column = qn(StoredEvent._meta.db_table), qn(model_field.column)
    recent = f"SELECT {column} AS top_value FROM {table} ORDER BY {qn('id')} DESC LIMIT %s"
    sql = (
        f"SELECT top_value FROM ({recent}) recent WHERE top_value IS NOT NULL "
        "GROUP BY top_value ORDER BY COUNT(*) DESC, top_value LIMIT %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [window, limit])
        return [row[0] for row in cursor.fetchall()]


class TopValuesFilter(admin.SimpleListFilter):
    """Filter on an indexed column, offering its most frequent recent values (plus the selected one)."""

    field_name = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        window = getattr(model_admin, "top_values_window", 10_000)
        limit = getattr(model_admin, "top_values_limit", 20)
        using = model_admin.get_queryset(request).db
        values = top_values(self.field_name, window, limit, using)
        selected = self.value()
        if selected is not None and selected not in values:
            values.append(selected)  # a value from a link or an older event still shows as selected
        return [(value, value) for value in values]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        value = self.value()
        return queryset.filter(**{self.field_name: value}) if value is not None else queryset


class TopicFilter(TopValuesFilter):
    title = "topic (most frequent recently)"
    parameter_name = "topic"
    field_name = "topic"


class SourceFilter(TopValuesFilter):
    title = "source (most frequent recently)"
    parameter_name = "source"
    field_name = "source"


class EventLogChangeList(ChangeList):
    """Always newest first: ``?o=`` (ordering from the URL) would sort the whole log."""

    def get_ordering(self, request: HttpRequest, queryset: QuerySet[Any]) -> list[Any]:
        return ["-pk"]


@admin.register(StoredEvent)
class StoredEventAdmin(StoredEventAdminBase):
    """Read-only event log. Subclass it (and re-register) to change the tuning attributes."""

    list_display = ("time", "type", "topic", "source", "short_payload")
    list_display_links = ("time",)
    list_filter = ("type", TopicFilter, SourceFilter, ("timestamp", admin.DateFieldListFilter))
    # Only used to show the search box: get_search_results() builds the (indexed) query itself.
    search_fields = ("event_id", "correlation_id", "topic")
    search_help_text = "An event id, a correlation id (exact), or the start of a topic."
    ordering = ("-id",)
    sortable_by = ()
    list_per_page = 100
    paginator = EventLogPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    actions = ("republish",)
    fields = (
        "event_id",
        "type",
        "topic",
        "time_detail",
        "log_position",
        "source",
        "correlation",
        "payload_json",
        "metadata_json",
    )
    readonly_fields = fields
    change_list_template = "admin/django_eventbus/storedevent/change_list.html"

    #: Rows read to find the most frequent topics and sources for the filters.
    top_values_window = 10_000
    #: Values offered by each of those filters.
    top_values_limit = 20

    # -- permissions: the log is written by the bus and pruned by eventbus_prune only --------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: StoredEvent | None = None) -> bool:
        return False  # users with the view permission get the read-only detail page

    def has_delete_permission(self, request: HttpRequest, obj: StoredEvent | None = None) -> bool:
        return False

    def has_republish_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("django_eventbus.republish_storedevent")

    # -- list --------------------------------------------------------------------------

    @admin.display(description="time")
    def time(self, obj: StoredEvent) -> str:
        # Milliseconds matter in an event log; admin-live.js renders live rows the same way.
        return format_time(obj.timestamp)

    @admin.display(description="payload")
    def short_payload(self, obj: StoredEvent) -> str:
        return short_json(obj.payload)

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return EventLogChangeList

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[StoredEvent], search_term: str
    ) -> tuple[QuerySet[StoredEvent], bool]:
        """The events with this event id or correlation id; failing that, those whose topic starts with it.

        Two steps rather than one ``OR``: the id lookups are equalities on indexed
        columns, but a ``LIKE 'prefix%'`` can only use an index with a pattern operator
        class (or the C collation), and one unindexable branch makes PostgreSQL scan
        the whole log for the whole ``OR`` (figures in bench/README.md, Admin).
        """
        term = search_term.strip()
        if not term:
            return queryset, False
        by_id = queryset.filter(Q(event_id=term) | Q(correlation_id=term))
        if by_id.exists():
            return by_id, False
        return queryset.filter(topic__startswith=term), False

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        context = {**(extra_context or {}), **self.live_context(request)}
        return super().changelist_view(request, context)

    def live_context(self, request: HttpRequest) -> dict[str, Any]:
        """What the "Follow live" toggle needs; empty when live mode is off or not allowed."""
        url = conf.ADMIN_WEBSOCKET_URL
        # The websocket consumer is a Channels app: without Channels there is nothing to connect to.
        if not url or not apps.is_installed("channels") or not self.has_view_permission(request):
            return {}
        return {
            "eventbus_live": {
                "url": url,
                # The websocket frames carry event ids, not log ids: get_object() accepts both.
                "detail_url": reverse("admin:django_eventbus_storedevent_change", args=["__id__"]),
                "time_zone": settings.TIME_ZONE if settings.USE_TZ else None,
                "filters": {
                    "type": request.GET.get("type__exact"),
                    "topic": request.GET.get("topic"),
                    "source": request.GET.get("source"),
                    "q": request.GET.get("q", "").strip() or None,
                },
                "types": dict(StoredEvent._meta.get_field("type").flatchoices),
                "actions": bool(self.get_actions(request)),
            }
        }

    # -- detail ------------------------------------------------------------------------

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> StoredEvent | None:
        """The event by log id, or by event id (the links of rows added by live mode)."""
        obj = super().get_object(request, object_id, from_field)
        if obj is None and from_field is None and not object_id.isdigit():
            obj = self.get_queryset(request).filter(event_id=object_id).first()
        return obj

    @admin.display(description="time")
    def time_detail(self, obj: StoredEvent) -> str:
        zone = localtime(obj.timestamp).tzname() if settings.USE_TZ else ""
        return f"{format_time(obj.timestamp)} {zone}".strip()

    @admin.display(description="log id")
    def log_position(self, obj: StoredEvent) -> int:
        return obj.pk

    @admin.display(description="correlation id")
    def correlation(self, obj: StoredEvent) -> str:
        if not obj.correlation_id:
            return "-"
        url = reverse("admin:django_eventbus_storedevent_changelist")
        query = urlencode({"q": obj.correlation_id})
        return format_html(
            '{} (<a href="{}?{}">events of this correlation</a>)', obj.correlation_id, url, query
        )

    @admin.display(description="payload")
    def payload_json(self, obj: StoredEvent) -> SafeString:
        return pretty_json(obj.payload)

    @admin.display(description="metadata")
    def metadata_json(self, obj: StoredEvent) -> SafeString:
        return pretty_json(obj.metadata)

    # -- re-publish ----------------------------------------------------------------------

    @admin.action(permissions=["republish"], description="Re-publish selected events (same event ids)")
    def republish(self, request: HttpRequest, queryset: QuerySet[StoredEvent]) -> TemplateResponse | None:
        """Send the selected events through the bus again, in log order, with their own event ids.

        Nothing is written to the log (the rows are already there): consumers that
        deduplicate by event id skip what they handled — durable consumers do, the
        Channels forwarder too — and every other subscriber (non-durable consumers,
        plain bus subscriptions) sees the event again.
        A confirmation page first says what will be sent; only its POST (with CSRF
        token, like every admin action) sends.
        """
        if request.POST.get("post") != "yes":
            return self.republish_confirmation(request, queryset)
        from .delivery.runtime import get_runner

        runner = get_runner()
        sent = 0
        try:
            for batch in _batches(queryset.order_by("id").iterator(chunk_size=REPUBLISH_BATCH)):
                runner.call(functools.partial(_publish_many, events=batch))
                sent += len(batch)
        except Exception as exc:
            logger.exception("re-publishing events from the admin failed after %d events", sent)
            self.message_user(
                request,
                f"Re-publishing failed after {sent} event(s): {exc}. The log is unchanged.",
                messages.ERROR,
            )
            return None
        logger.info("%s re-published %d event(s) from the admin", request.user, sent)
        self.message_user(request, f"Re-published {sent} event(s) with their original event ids.")
        return None

    def republish_confirmation(
        self, request: HttpRequest, queryset: QuerySet[StoredEvent]
    ) -> TemplateResponse:
        """What the action will send: how many events, on which topics, the first of them."""
        rows = queryset.order_by("id")
        topics = rows.order_by().values("topic").annotate(n=models.Count("id")).order_by("-n", "topic")
        context = {
            **self.admin_site.each_context(request),
            "title": "Re-publish events?",
            "opts": self.model._meta,
            "count": rows.count(),
            "topics": list(topics[: self.REPUBLISH_TOPICS_SHOWN]),
            "sample": list(rows[: self.REPUBLISH_SAMPLE]),
            "selected": request.POST.getlist(ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across") == "1",
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(
            request, "admin/django_eventbus/storedevent/republish_confirmation.html", context
        )

    #: Topics and events listed on the confirmation page.
    REPUBLISH_TOPICS_SHOWN = 20
    REPUBLISH_SAMPLE = 20


async def _publish_many(bus: BaseEventBus, events: list[Event]) -> None:
    await bus.publish_many(events)


def _batches(rows: Iterable[StoredEvent]) -> Iterable[list[Event]]:
    batch: list[Event] = []
    for row in rows:
        batch.append(row.to_event())
        if len(batch) >= REPUBLISH_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


@admin.register(DeadLetter)
class DeadLetterAdmin(DeadLetterAdminBase):
    """Events a consumer gave up on, for a human to look at (deleting them is allowed)."""

    list_display = ("created_at", "consumer", "topic", "event_id", "attempts", "short_error")
    list_filter = ("consumer",)
    search_fields = ("=event_id", "=consumer")
    show_full_result_count = False
    fields = ("consumer", "event_id", "topic", "attempts", "created_at", "error_text", "event_json")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: DeadLetter | None = None) -> bool:
        return False

    @admin.display(description="error")
    def short_error(self, obj: DeadLetter) -> str:
        first_line = obj.error.strip().splitlines()[-1:] or [""]
        return first_line[0][:120]

    @admin.display(description="error")
    def error_text(self, obj: DeadLetter) -> SafeString:
        return format_html('<pre class="eventbus-json">{}</pre>', obj.error)

    @admin.display(description="event")
    def event_json(self, obj: DeadLetter) -> SafeString:
        return pretty_json(obj.event)


@admin.register(ConsumerCursor)
class ConsumerCursorAdmin(CursorAdminBase):
    """Durable consumers' positions in the log (``manage.py eventbus_status`` shows their lag)."""

    list_display = ("name", "position", "updated_at")
    fields = ("name", "position", "updated_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ConsumerCursor | None = None) -> bool:
        return False
