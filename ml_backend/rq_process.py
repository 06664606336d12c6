"""The skeleton of our rq processes (the worker and the trainer), written once.

Each command parses ``--name`` and ``--burst``, reads the settings from the environment, sets
up logging and Redis, announces itself with a heartbeat (``ml_backend.heartbeat``) and runs an
rq ``SimpleWorker`` (jobs in this process: no fork, so what it loaded stays loaded) on its
queues, in priority order. A Redis outage ends rq's loop; the loop starts again once Redis
answers, with what the process holds intact. The module's ``__main__`` runs ``main()`` in the
importable module (see :func:`run_module`), because rq resolves job functions by import."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.queue import Queue
from rq.serializers import JSONSerializer

from ml_backend.heartbeat import Heartbeat
from ml_backend.settings import Settings, settings_for_command

log = logging.getLogger(__name__)


@dataclass
class Process:
    """What a command starts with: its arguments, settings and Redis connection."""

    name: str
    burst: bool
    settings: Settings
    redis: Redis


def start(prog: str, description: str, default_name: str, argv: Sequence[str] | None,
          env: Mapping[str, str] | None) -> Process | None:
    """Parse the command line and the settings, set up logging and Redis.

    Returns:
        The process, or None when a setting is invalid (the reason is printed; exit code 2).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=default_name, help=f"name (default: {default_name})")
    parser.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    args = parser.parse_args(argv)
    settings = settings_for_command(os.environ if env is None else env)
    if settings is None:
        return None
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Process(args.name, args.burst, settings, Redis.from_url(settings.redis_url))


def serve(process: Process, queue_names: Sequence[str], heartbeat: Heartbeat,
          worker_class: type[SimpleWorker] = SimpleWorker,
          prepare: Callable[[SimpleWorker], None] | None = None) -> int:
    """Run ``worker_class`` on ``queue_names`` (first name first) until it stops; restart its
    loop after a Redis outage. ``prepare`` is called on each new rq worker."""
    queues = [Queue(name, connection=process.redis, serializer=JSONSerializer)
              for name in queue_names]
    heartbeat.start()  # live at once: jobs sent meanwhile wait in the queues
    try:
        while True:
            worker = worker_class(queues, name=process.name, connection=process.redis,
                                  serializer=JSONSerializer)
            if prepare is not None:
                prepare(worker)
            try:
                worker.work(burst=process.burst, logging_level=process.settings.log_level,
                            with_scheduler=False)
                return 0
            except RedisError as exc:
                log.warning("lost Redis (%s); serving again once it is back", exc)
                _wait_for_redis(process.redis, worker)
    finally:
        heartbeat.stop()


def _wait_for_redis(redis: Redis, worker: SimpleWorker, pause_s: float = 1.0) -> None:
    """Block until Redis answers, then clear the old registration so the name can be reused."""
    while True:
        time.sleep(pause_s)
        try:
            redis.ping()
            worker.register_death()
            return
        except RedisError:
            continue


def run_module(module: str) -> None:
    """``python -m <module>``: run ``main()`` of the imported module, not of ``__main__``, so
    that the state it sets is the one rq's job functions (resolved by import) see."""
    sys.exit(importlib.import_module(module).main())
