"""The one reconnect backoff of the project: jittered exponential delays."""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["backoff_delays"]


def backoff_delays(initial: float = 0.05, maximum: float = 5.0, factor: float = 2.0) -> Iterator[float]:
    """Yield delays that grow by ``factor`` up to ``maximum``, each with "equal jitter".

    Half of each delay is fixed and half random, so a crowd of listeners that lost
    the same server does not reconnect in lock-step, yet none retries too eagerly.
    """
    delay = initial
    while True:
        yield delay / 2 + random.uniform(0, delay / 2)
        delay = min(maximum, delay * factor)
