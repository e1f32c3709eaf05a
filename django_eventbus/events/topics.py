"""Topic patterns: the one place that knows their syntax.

A subscription string containing ``*``, ``?`` or ``[`` is a pattern with fnmatch
syntax (``inventory:*``, ``a?c``, ``[!a]*``; ``[[]`` and ``[*]`` are a literal
``[`` and ``*``), matched case-sensitively on every OS. Every layer asks this
module: the buses' local dispatch, registered consumers, the Channels groups and
websocket consumer, and the Redis bus, which needs a PSUBSCRIBE glob that
receives at least what a pattern matches (:func:`redis_glob`).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable

__all__ = ["PATTERN_CHARS", "is_pattern", "literal_head", "pattern_error", "redis_glob", "topic_matches"]

#: fnmatch metacharacters: a subscription string containing one of them is a pattern.
PATTERN_CHARS = frozenset("*?[")
# Characters Redis' glob matcher treats specially; escaped with a backslash in the literal head.
_GLOB_SPECIAL = frozenset("\\*?[]")


def is_pattern(text: str) -> bool:
    """Whether a subscription string is a pattern (contains ``*``, ``?`` or ``[``)."""
    return any(char in PATTERN_CHARS for char in text)


def literal_head(pattern: str) -> str:
    """The part of ``pattern`` before its first metacharacter: every match starts with it."""
    for index, char in enumerate(pattern):
        if char in PATTERN_CHARS:
            return pattern[:index]
    return pattern


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> Callable[[str], re.Match[str] | None]:
    # fnmatch.fnmatch would normcase (ignore case on Windows); the compiled regex never does.
    return re.compile(fnmatch.translate(pattern)).match


def topic_matches(pattern: str, topic: str) -> bool:
    """fnmatch semantics, case-sensitive on every OS (``A:B`` is not ``a:b``)."""
    return _compile(pattern)(topic) is not None


def pattern_error(pattern: str) -> str | None:
    """Why ``pattern`` is malformed, or ``None`` if it is fine (a plain topic always is)."""
    # fnmatch would quietly read an unclosed "[" as a literal; a client that wrote one
    # more likely made a mistake, so say so (same scan as fnmatch.translate's).
    index = pattern.find("[")
    while index >= 0:
        start = index + 1
        if pattern[start : start + 1] == "!":
            start += 1
        if pattern[start : start + 1] == "]":
            start += 1
        end = pattern.find("]", start)
        if end < 0:
            return "an unclosed '[' in the pattern"
        index = pattern.find("[", end + 1)
    try:
        _compile(pattern)
    except re.error as exc:
        return f"the pattern does not compile: {exc}"
    return None


@functools.lru_cache(maxsize=1024)
def redis_glob(channel_prefix: str, pattern: str) -> str:
    """The Redis PSUBSCRIBE glob that matches (at least) every channel of fnmatch ``pattern``.

    Redis' glob syntax differs from fnmatch (``[^x]`` vs ``[!x]``, backslash
    escapes), so only the pattern's literal head up to its first metacharacter
    is kept, escaped, followed by ``*``; the bus then filters with
    :func:`topic_matches`. A pattern without metacharacters maps to its own
    (escaped) channel name.
    """
    head = literal_head(pattern)
    escaped = "".join("\\" + c if c in _GLOB_SPECIAL else c for c in f"{channel_prefix}:{head}")
    return escaped + "*" if len(head) < len(pattern) else escaped
