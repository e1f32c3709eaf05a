"""Topic -> Channels group names: valid for every layer, never colliding, and covering patterns."""

from __future__ import annotations

import random
import string

import pytest
from channels.layers import BaseChannelLayer

from django_eventbus.channels.groups import (
    ALL_GROUP,
    MAX_PREFIX_DEPTH,
    group_name,
    groups_for_topic,
    prefix_group_name,
    subscription_group,
)
from django_eventbus.events.dispatch import topic_matches

# Channels' own validation (every layer calls it): the rule our names must obey.
VALIDATOR = BaseChannelLayer()

LOOKALIKES = ["a:b", "a.b", "a-b", "a_b", "A:B", "a b", "a/b", "ä:b", "a:b:", "a:", "a", "a_3ab", "a:3ab"]


def assert_valid(name: str) -> None:
    assert VALIDATOR.require_valid_group_name(name)
    assert len(name) < 100


@pytest.mark.parametrize("topic", LOOKALIKES)
def test_group_names_are_valid(topic: str) -> None:
    assert_valid(group_name(topic))
    for name in groups_for_topic(topic):
        assert_valid(name)


def test_lookalike_topics_get_distinct_groups() -> None:
    # The bug of the public implementations: a:b, a.b, a-b and a_b all became one group.
    names = [group_name(t) for t in LOOKALIKES]
    assert len(set(names)) == len(names), dict(zip(LOOKALIKES, names, strict=True))


def test_escape_sequences_do_not_collide_with_literal_text() -> None:
    # "_" is the escape character, so a literal "_3a" must not read like an escaped ":".
    assert group_name("a:b") != group_name("a_3ab")
    assert group_name("a_3ab") == "eventbus.t.a_5f3ab"
    assert group_name("inventory:product") == "eventbus.t.inventory_3aproduct"


def test_non_ascii_is_kept_not_dropped() -> None:
    assert group_name("ä") != group_name("a") != group_name("ö")
    assert group_name("ä") == "eventbus.t._c3_a4"
    assert_valid(group_name("\ud800"))  # a lone surrogate (possible in JSON) still encodes


def test_long_topics_are_hashed_within_the_limit_and_stay_distinct() -> None:
    base = "x" * 300
    variants = [base, base + "y", base[:-1] + "z", "y" + base, "x" * 88, "x" * 89, "x" * 90]
    names = [group_name(t) for t in variants]
    for name in names:
        assert_valid(name)
    assert len(set(names)) == len(names)
    # Topics that share the first 100 characters differ only in the digest.
    assert group_name(base + "1")[:50] == group_name(base + "2")[:50]
    assert group_name(base + "1") != group_name(base + "2")
    # The longest short name and the hashed names live in separate namespaces.
    assert group_name("x" * 88).startswith("eventbus.t.")
    assert group_name("x" * 89).startswith("eventbus.th.")
    long_unicode = "ä" * 200
    assert_valid(group_name(long_unicode))


def test_topic_and_prefix_groups_never_meet() -> None:
    assert group_name("a:") != prefix_group_name("a:")
    assert ALL_GROUP not in {group_name("all"), group_name("*")}
    assert subscription_group("*") == ALL_GROUP
    with pytest.raises(ValueError):
        prefix_group_name("a")
    with pytest.raises(ValueError):
        group_name("")


def test_an_event_goes_to_its_topic_each_prefix_and_all() -> None:
    assert groups_for_topic("inventory:product") == (
        group_name("inventory:product"),
        prefix_group_name("inventory:"),
        ALL_GROUP,
    )
    assert groups_for_topic("plain") == (group_name("plain"), ALL_GROUP)
    assert groups_for_topic("a:b:c") == (
        group_name("a:b:c"),
        prefix_group_name("a:"),
        prefix_group_name("a:b:"),
        ALL_GROUP,
    )


def test_prefix_groups_are_bounded_in_depth() -> None:
    deep = ":".join("abcdefghij")
    assert len(groups_for_topic(deep)) == 1 + MAX_PREFIX_DEPTH + 1
    # A deeper prefix pattern joins the deepest group that exists (and filters).
    pattern = ":".join("abcdefgh") + ":*"
    assert subscription_group(pattern) == prefix_group_name("a:b:c:d:")
    assert subscription_group(pattern) in groups_for_topic(deep)


def test_subscription_groups() -> None:
    assert subscription_group("inventory:product") == group_name("inventory:product")
    assert subscription_group("inventory:*") == prefix_group_name("inventory:")
    assert subscription_group("inventory:prod*") == prefix_group_name("inventory:")
    assert subscription_group("inventory:product:?") == prefix_group_name("inventory:product:")
    assert subscription_group("*:product") == ALL_GROUP
    assert subscription_group("inv?ntory:*") == ALL_GROUP
    assert subscription_group("inventory*") == ALL_GROUP
    assert subscription_group("[ab]:*") == ALL_GROUP


ALPHABET = "ab:._-*?[]!ä"


def random_text(rng: random.Random, chars: str, size: int) -> str:
    return "".join(rng.choice(chars) for _ in range(rng.randint(1, size)))


def test_every_match_is_reachable_through_the_subscription_group() -> None:
    """The invariant of the scheme: a pattern's group receives every topic it matches."""
    rng = random.Random(6)
    topic_chars = "ab:.-_ä"
    checked = 0
    for _ in range(20_000):
        topic = random_text(rng, topic_chars, 12)
        pattern = random_text(rng, ALPHABET, 8)
        if topic_matches(pattern, topic):
            checked += 1
            assert subscription_group(pattern) in groups_for_topic(topic), (pattern, topic)
    # Patterns built from a topic by replacing a tail with "*" always match it.
    for _ in range(5_000):
        topic = random_text(rng, topic_chars, 16)
        cut = rng.randint(0, len(topic))
        pattern = topic[:cut] + "*"
        assert topic_matches(pattern, topic)
        assert subscription_group(pattern) in groups_for_topic(topic), (pattern, topic)
        checked += 1
    assert checked > 5_000


def test_encoding_is_injective_on_random_topics() -> None:
    rng = random.Random(7)
    chars = string.ascii_letters[:4] + ":._-_3a" + "äß€😀"
    seen: dict[str, str] = {}
    for _ in range(30_000):
        topic = random_text(rng, chars, 120)
        name = group_name(topic)
        assert seen.setdefault(name, topic) == topic, (name, topic, seen[name])
        assert_valid(name)
