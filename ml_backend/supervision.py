"""Keeping child processes alive and accounted for: the pids a run leaves in its state file
(stopped by the next run when it died without cleaning up), restarts with exponential back-off
that give up after repeated crashes, and the signals that stop it all."""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml_backend.errors import StackError
from ml_backend.processes import Child, command_line, pid_alive, spawn, stop_pids
from talk2sam.files import atomic_write_text

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0
RESTART_FIRST_S = 1.0  # back-off before restarting a process that died: 1, 2, 4, ... s
RESTART_MAX_S = 30.0
CRASH_WINDOW_S = 300.0
MAX_CRASHES = 5  # exits of one process within CRASH_WINDOW_S are forgiven


class StateFile:
    """``<data-dir>/stack.json``: pids of the stack, its embedded server and its children."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write(self, **state: Any) -> None:
        atomic_write_text(self.path, json.dumps(state, indent=1), durable=False)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def stop_leftovers(self) -> None:
        """Stop what a previous run that died without cleaning up left running.

        Raises:
            StackError: the recorded stack itself is still running.
        """
        state = self.read()
        stack_pid = state.get("stack_pid")
        if isinstance(stack_pid, int) and stack_pid != os.getpid() and pid_alive(stack_pid) \
                and any(m in command_line(stack_pid) for m in ("ml_backend.stack", "talk2sam-stack")):
            raise StackError(f"another stack (pid {stack_pid}) runs with data dir "
                             f"{self.path.parent}; stop it first (Ctrl-C or kill {stack_pid})")
        leftovers = [pid for pid in state.get("children", []) if isinstance(pid, int)
                     and pid_alive(pid) and "ml_backend." in command_line(pid)]
        server = state.get("server_pid")
        if isinstance(server, int) and pid_alive(server) and "valkey-server" in command_line(server):
            leftovers.append(server)
        if leftovers:
            log.warning("a previous stack did not stop cleanly; stopping its orphans: pids %s",
                        leftovers)
            stop_pids(leftovers, STOP_TIMEOUT_S)
        self.remove()


class Signals:
    """SIGINT/SIGTERM set ``received``; a second one sets ``force`` too."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.force = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received is not None:
            self.force = True
        self.received = signum


class Restarts:
    """The recent exits of one process and when to start it again (exponential back-off)."""

    def __init__(self) -> None:
        self.exits: list[float] = []  # monotonic times within CRASH_WINDOW_S
        self.due: float | None = None  # when to restart it; None while it runs

    def exited(self, now: float) -> float | None:
        """Record an exit: the delay before the restart, or None after too many crashes."""
        self.exits = [t for t in self.exits if now - t < CRASH_WINDOW_S] + [now]
        if len(self.exits) > MAX_CRASHES:
            return None
        delay = min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** (len(self.exits) - 1))
        self.due = now + delay
        return delay

    def is_due(self, now: float) -> bool:
        return self.due is not None and now >= self.due


@dataclass
class Supervised:
    """A child the stack keeps running: how to start it, the running process, its restarts."""

    role: str
    argv: list[str]
    env: dict[str, str]
    nice: int = 0
    child: Child | None = None
    restarts: Restarts = field(default_factory=Restarts)

    def start(self) -> None:
        self.child = spawn(self.role, self.argv, self.env, nice=self.nice)
        self.restarts.due = None
