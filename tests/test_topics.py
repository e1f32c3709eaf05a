"""Topic patterns (django_eventbus.events.topics): the one matcher every layer uses."""

from __future__ import annotations

import uuid

import pytest
import redis

from django_eventbus.events.topics import is_pattern, literal_head, pattern_error, redis_glob, topic_matches
from tests.services import require_redis

# (pattern, topic, matches)
MATCH_CASES = [
    ("inventory:product", "inventory:product", True),
    ("inventory:product", "inventory:products", False),
    ("inventory:*", "inventory:product", True),
    ("inventory:*", "inventory:", True),
    ("inventory:*", "billing:product", False),
    ("*", "", True),
    ("*", "a:b:c", True),
    ("a?c", "abc", True),
    ("a?c", "ac", False),
    ("a?c", "abbc", False),
    ("[ab]x", "bx", True),
    ("[ab]x", "cx", False),
    ("[!a]*", "bcd", True),
    ("[!a]*", "abc", False),
    ("[!a]*", "", False),  # [!a] needs one character
    ("[a-c]:*", "b:x", True),
    ("[a-c]:*", "d:x", False),
    # brackets make metacharacters literal: fnmatch has no backslash escape
    ("x[[]y", "x[y", True),
    ("x[[]y", "xy", False),
    ("x[*]", "x*", True),
    ("x[*]", "xa", False),
    ("x[?]", "x?", True),
    ("x[?]", "xa", False),
    ("[]]", "]", True),
    ("[!]]", "]", False),
    ("[!]]", "a", True),
    ("x\\*", "x\\abc", True),  # a backslash is a literal character
    ("x\\*", "x*", False),
    # case-sensitive on every OS
    ("A:*", "a:b", False),
    ("a:*", "A:b", False),
    ("Inventory:Product", "inventory:product", False),
    ("ä:*", "ä:b", True),
    ("ä:*", "Ä:b", False),
    # a pattern matches the whole topic, not a prefix
    ("a", "ab", False),
    ("a*b", "axbz", False),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCH_CASES)
def test_topic_matches(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


@pytest.mark.parametrize(
    ("text", "pattern", "head"),
    [
        ("inventory:product", False, "inventory:product"),
        ("a]", False, "a]"),
        ("inventory:*", True, "inventory:"),
        ("a?c*", True, "a"),
        ("[a]b", True, ""),
        ("x\\*", True, "x\\"),
    ],
)
def test_is_pattern_and_literal_head(text: str, pattern: bool, head: str) -> None:
    assert is_pattern(text) is pattern
    assert literal_head(text) == head


@pytest.mark.parametrize(
    ("pattern", "error"),
    [
        ("inventory:*", None),
        ("[!a]*", None),
        ("x[[]y", None),
        ("[]]", None),
        ("plain", None),
        ("a[", "unclosed"),
        ("a[b", "unclosed"),
        ("[]", "unclosed"),  # "]" right after "[" is literal, so this "[" is open
        ("[!]", "unclosed"),
        ("[ab]c[", "unclosed"),
    ],
)
def test_pattern_error(pattern: str, error: str | None) -> None:
    problem = pattern_error(pattern)
    if error is None:
        assert problem is None
    else:
        assert problem is not None and error in problem


@pytest.mark.parametrize(
    ("prefix", "pattern", "glob"),
    [
        ("events", "inventory:*", "events:inventory:*"),
        ("events", "a?c", "events:a*"),
        ("events", "[ab]x", "events:*"),
        ("events", "[!a]*", "events:*"),
        ("events", "exact:topic", "events:exact:topic"),  # no metacharacter: its own channel
        ("ev*?", "a\\b]:*", "ev\\*\\?:a\\\\b\\]:*"),  # Redis glob specials in the literal part escaped
    ],
)
def test_redis_glob(prefix: str, pattern: str, glob: str) -> None:
    assert redis_glob(prefix, pattern) == glob


SUPERSET_PATTERNS = sorted({p for p, _, _ in MATCH_CASES} | {"a]b", "a\\b", "x]*", "a[b]]", "?", "*:*"})
SUPERSET_TOPICS = sorted(
    {t for _, t, _ in MATCH_CASES} | {"a]b", "a\\b", "a\\\\b", "x]", "abb]", "a:*", "a:?", "a:[b]", "x*\\1"}
)


@pytest.mark.redis
def test_redis_glob_receives_every_matching_topic_from_a_real_redis() -> None:
    """The superset property, judged by Redis itself: PUBLISH counts the PSUBSCRIBE globs it reached.

    For each pattern, only its glob is subscribed on a prefix no one else uses, so
    PUBLISH returns 1 exactly when Redis' matcher accepts the channel; every topic
    the pattern matches must be among those (more is allowed: the bus filters).
    """
    client = redis.Redis.from_url(require_redis())
    pubsub = client.pubsub()
    prefix = f"topics-{uuid.uuid4().hex[:8]}[*?\\]"  # Redis glob specials in the prefix too
    try:
        for pattern in SUPERSET_PATTERNS:
            glob = redis_glob(prefix, pattern)
            pubsub.psubscribe(glob)
            confirm = pubsub.get_message(timeout=5)
            assert confirm is not None and confirm["type"] == "psubscribe", confirm
            reached = {topic for topic in SUPERSET_TOPICS if client.publish(f"{prefix}:{topic}", b"x") == 1}
            matched = {topic for topic in SUPERSET_TOPICS if topic_matches(pattern, topic)}
            assert matched <= reached, (pattern, glob, matched - reached)
            if not is_pattern(pattern):
                assert reached == matched, (pattern, glob)  # a plain topic's channel is exact
            for _ in reached:  # the messages did arrive, one per publish that counted them
                message = pubsub.get_message(timeout=5)
                assert message is not None and message["type"] == "pmessage", message
                assert message["pattern"] == glob.encode()
            pubsub.punsubscribe(glob)  # type: ignore[no-untyped-call, unused-ignore]
            confirm = pubsub.get_message(timeout=5)
            assert confirm is not None and confirm["type"] == "punsubscribe", confirm
    finally:
        pubsub.close()
        client.close()
