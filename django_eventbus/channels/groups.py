"""Topics to Channels group names, and the groups an event is sent to.

Channels group names may only contain ``[a-zA-Z0-9._-]`` and must be shorter
than 100 characters, while topics are any non-empty string (``inventory:product``,
``a.b``, ``ä:b``, a 300-character id…). So a topic is *encoded*, never sanitised:

* ASCII letters, digits, ``-`` and ``.`` stay as they are;
* every other character becomes ``_`` plus the two hex digits of each of its
  UTF-8 bytes (``:`` -> ``_3a``, ``_`` -> ``_5f``, ``ä`` -> ``_c3_a4``).

That code is injective (``_`` only ever starts an escape), so ``a:b``, ``a.b``,
``a-b``, ``a_b`` and ``A:B`` are five different groups. A name that would reach
the length limit is replaced by a readable head plus a SHA-256 digest (160 bits)
of the whole topic, in a namespace of its own (``eventbus.th.…``) so it can never
equal a short name.

Group kinds (``eventbus.`` + kind + ``.`` + encoding):

=====================  ===============================  ===============================
group                  receives                         joined for the subscription
=====================  ===============================  ===============================
``eventbus.t.<enc>``   events on exactly that topic     ``inventory:product``
``eventbus.p.<enc>``   topics starting with the prefix  ``inventory:*`` (prefix ``inventory:``)
``eventbus.all``       every event                      ``*``
=====================  ===============================  ===============================

Every socket of an authenticated user also joins ``eventbus.u.<enc of the user's pk>``
(:func:`user_group`): logging out or deactivating the user closes them through it,
in every server process.

An event on ``a:b:c`` is sent to the groups of ``a:b:c``, ``a:b:*``, ``a:*`` and
``*``: one per colon-terminated prefix (the first :data:`MAX_PREFIX_DEPTH`),
so a subscriber of ``inventory:*`` receives ``inventory:product`` and
``inventory:order``. Any other fnmatch pattern (``inventory:prod*``,
``*:product``) is served from the group of its longest literal colon prefix
(or ``eventbus.all``) and filtered with
:func:`~django_eventbus.events.topics.topic_matches`, which
:class:`~django_eventbus.channels.consumer.EventsConsumer` does. The invariant
the tests check: whenever ``topic_matches(pattern, topic)``,
``subscription_group(pattern) in groups_for_topic(topic)``.
"""

from __future__ import annotations

import functools
import hashlib
import string

from django_eventbus.events.topics import PATTERN_CHARS, is_pattern, literal_head

__all__ = [
    "ALL_GROUP",
    "MAX_GROUP_LENGTH",
    "MAX_PREFIX_DEPTH",
    "PATTERN_CHARS",
    "group_name",
    "groups_for_topic",
    "is_pattern",
    "literal_head",
    "prefix_group_name",
    "subscription_group",
    "user_group",
]

#: Channels requires ``len(name) < 100``.
MAX_GROUP_LENGTH = 99
#: An event goes to the groups of at most this many colon prefixes (``a:``, ``a:b:``…);
#: deeper prefix patterns join the deepest of these and filter.
MAX_PREFIX_DEPTH = 4
#: The group every event is sent to (subscribed to by the pattern ``*``).
ALL_GROUP = "eventbus.all"

_NAMESPACE = "eventbus"
_SAFE = frozenset(string.ascii_letters + string.digits + "-.")
_DIGEST_CHARS = 40  # hex digits of SHA-256 kept: 160 bits, collisions are not a practical concern


def _encode(text: str) -> str:
    # surrogatepass: a lone surrogate (possible in JSON input) still encodes, injectively.
    out: list[str] = []
    for char in text:
        if char in _SAFE:
            out.append(char)
        else:
            out.extend(f"_{byte:02x}" for byte in char.encode("utf-8", "surrogatepass"))
    return "".join(out)


def _name(kind: str, text: str) -> str:
    encoded = _encode(text)
    name = f"{_NAMESPACE}.{kind}.{encoded}"
    if len(name) <= MAX_GROUP_LENGTH:
        return name
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARS]
    head = f"{_NAMESPACE}.{kind}h."
    room = MAX_GROUP_LENGTH - len(head) - 1 - _DIGEST_CHARS
    # The head is only there to make the name readable in redis-cli; the digest identifies.
    return f"{head}{encoded[:room]}.{digest}"


@functools.lru_cache(maxsize=4096)
def group_name(topic: str) -> str:
    """The Channels group of the events on exactly ``topic`` (valid, unique per topic).

    Use it to receive events in a consumer of your own::

        await self.channel_layer.group_add(group_name("inventory:product"), self.channel_name)

    Messages arrive with ``type`` ``"eventbus.event"`` (handler method ``eventbus_event``)
    and the event as a dict in ``message["event"]`` (:meth:`Event.to_dict`). Note that
    the group of a literal topic ``inventory:*`` is not the pattern's group: use
    :func:`subscription_group` for patterns.
    """
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"a topic is a non-empty string, got {topic!r}")
    return _name("t", topic)


@functools.lru_cache(maxsize=1024)
def prefix_group_name(prefix: str) -> str:
    """The group of every topic that starts with ``prefix`` (which ends with ``:``)."""
    if not prefix.endswith(":"):
        raise ValueError(f"a prefix group is for a colon-terminated prefix, got {prefix!r}")
    return _name("p", prefix)


def _colon_prefixes(text: str) -> list[str]:
    """``"a:b:c"`` -> ``["a:", "a:b:"]`` (at most :data:`MAX_PREFIX_DEPTH`, shallowest first)."""
    prefixes: list[str] = []
    start = 0
    while len(prefixes) < MAX_PREFIX_DEPTH:
        index = text.find(":", start)
        if index < 0:
            break
        prefixes.append(text[: index + 1])
        start = index + 1
    return prefixes


@functools.lru_cache(maxsize=4096)
def groups_for_topic(topic: str) -> tuple[str, ...]:
    """Every group an event on ``topic`` is sent to: its own, its prefixes', and ``eventbus.all``."""
    return (
        group_name(topic),
        *(prefix_group_name(prefix) for prefix in _colon_prefixes(topic)),
        ALL_GROUP,
    )


@functools.lru_cache(maxsize=1024)
def subscription_group(topic_or_pattern: str) -> str:
    """The one group to join to receive (at least) every event ``topic_or_pattern`` matches.

    A topic joins its own group; ``prefix:*`` joins the prefix group, which holds
    exactly its events; other patterns join the group of their longest literal
    colon prefix (or ``eventbus.all``) and need filtering with ``topic_matches``.
    """
    if not is_pattern(topic_or_pattern):
        return group_name(topic_or_pattern)
    prefixes = _colon_prefixes(literal_head(topic_or_pattern))
    return prefix_group_name(prefixes[-1]) if prefixes else ALL_GROUP


def user_group(pk: object) -> str:
    """The group every websocket of the user with primary key ``pk`` joins (to close them all)."""
    return _name("u", str(pk))
