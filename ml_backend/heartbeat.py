"""A process's heartbeat in Redis: one JSON key that expires unless refreshed, and the process's
name in a set of its kind, so that others can tell a live worker or trainer from a dead one.

rq's SimpleWorker sends no heartbeat of its own while a job runs, hence a daemon thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class Heartbeat:
    """Publishes ``state()`` at ``key`` every ``ttl_s / 3`` seconds and lists ``name`` in
    ``members``.

    Args:
        redis: connection (redis-py clients are thread-safe).
        key: the heartbeat key; it expires ``ttl_s`` after the last refresh.
        members: the set of live names of this kind (dead ones are pruned by readers).
        name: this process's name.
        ttl_s: expiry of the key.
        state: the JSON-able fields to publish.
    """

    def __init__(self, redis: Redis, key: str, members: str, name: str, ttl_s: int,
                 state: Callable[[], dict[str, Any]]):
        self._redis, self._key, self._members, self._name = redis, key, members, name
        self._ttl_s, self._state = ttl_s, state
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.publish()
        self._thread.start()

    def publish(self) -> None:
        """Write the heartbeat now; failures are logged, never raised (a dead heartbeat thread
        would make a healthy process look dead)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(self._key, json.dumps(self._state()), ex=self._ttl_s)
            pipe.sadd(self._members, self._name)
            pipe.execute()
        except Exception:  # see the docstring
            log.exception("heartbeat not published")

    def _run(self) -> None:
        while not self._stop.wait(self._ttl_s / 3):
            self.publish()

    def stop(self) -> None:
        self._stop.set()
        try:
            self._redis.delete(self._key)
            self._redis.srem(self._members, self._name)
        except RedisError:
            pass
