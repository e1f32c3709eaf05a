"""Middleware that gives each request a correlation id, carried by every event it causes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse

from .context import clean_correlation_id, new_correlation_id, reset_correlation_id, set_correlation_id

__all__ = ["CorrelationIdMiddleware"]

HEADERS = ("HTTP_X_REQUEST_ID", "HTTP_X_CORRELATION_ID")


def _from_request(request: HttpRequest) -> str:
    for header in HEADERS:
        value = clean_correlation_id(request.META.get(header))
        if value:
            return value
    return new_correlation_id()


class CorrelationIdMiddleware:
    """Take ``X-Request-ID`` / ``X-Correlation-ID`` (or generate one) for the request.

    The id is on ``request.correlation_id``, on every event emitted while the
    request runs, and echoed in the ``X-Correlation-ID`` response header.
    Works under WSGI and ASGI (sync and async capable).
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self.__acall__(request)
        value = _from_request(request)
        request.correlation_id = value  # type: ignore[attr-defined]
        token = set_correlation_id(value)
        try:
            response: HttpResponse = self.get_response(request)
        finally:
            reset_correlation_id(token)
        response["X-Correlation-ID"] = value
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        value = _from_request(request)
        request.correlation_id = value  # type: ignore[attr-defined]
        token = set_correlation_id(value)
        try:
            get_response: Callable[[HttpRequest], Awaitable[HttpResponse]] = self.get_response
            response = await get_response(request)
        finally:
            reset_correlation_id(token)
        response["X-Correlation-ID"] = value
        return response
