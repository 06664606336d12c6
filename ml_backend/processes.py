"""Child processes, one way for the stack, the benchmark and the test harnesses.

A child runs in a session (process group) of its own, so that stopping it stops what it
started too; its output goes to a log file or to ours; on Linux it gets SIGTERM when its parent
dies, even by SIGKILL. Stopping is SIGTERM to the group, a grace period, then SIGKILL."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ml_backend.errors import ChildExitedError

logger = logging.getLogger(__name__)  # "log" names the children's log files here


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(send: Callable[[int, int], None], target: int) -> bool:
    """Whether signal 0 reaches ``target`` (a pid with os.kill, a group with os.killpg)."""
    try:
        send(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is someone else's
    return True


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    if not _answers(os.kill, pid):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we know


def command_line(pid: int) -> str:
    """The command line of ``pid`` ("" when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except FileNotFoundError:
        if not Path("/proc/self").exists():  # macOS
            out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], check=False,
                                 capture_output=True, text=True)
            return out.stdout.strip()
        return ""
    except OSError:
        return ""


def signal_group(pid: int, signum: int) -> None:
    """Signal the process group led by ``pid`` (our children lead their own), else ``pid``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def stop_pids(pids: Sequence[int], timeout_s: float) -> list[int]:
    """SIGTERM each pid's group, wait up to ``timeout_s``, SIGKILL what is left.

    Returns:
        The pids that had to be killed.
    """
    for pid in pids:
        signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    killed = [p for p in pids if pid_alive(p)]
    for pid in killed:
        signal_group(pid, signal.SIGKILL)
    return killed


def _child_setup(parent: int, nice: int) -> Callable[[], None]:
    """preexec_fn: lower the child's priority by ``nice``; on Linux, SIGTERM the child when this
    process dies (even by SIGKILL)."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        if nice:
            os.nice(nice)
        if prctl is not None:
            prctl(pr_set_pdeathsig, signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before prctl
                os._exit(1)

    return preexec


@dataclass
class Child:
    """A started child process; ``log_path`` None: it writes to our stdout/stderr."""

    role: str
    proc: subprocess.Popen
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        """Raises ChildExitedError, with the log's tail, when the process has ended."""
        code = self.proc.poll()
        if code is not None:
            where = f"; last lines of {self.log_path}:\n{self.log_tail()}" if self.log_path else ""
            raise ChildExitedError(f"{self.role} exited with code {code}{where}")

    def stop(self, grace_s: float = 15.0) -> bool:
        """Stop the child and its group; returns whether something had to be killed."""
        return bool(stop_children([self], grace_s))


def stop_children(children: Sequence[Child], grace_s: float) -> list[Child]:
    """SIGTERM every child's group at once, wait up to ``grace_s`` for all of them, then
    SIGKILL the groups with anything left (a leader gone, its children not).

    Returns:
        The children whose group had to be killed.
    """
    for child in children:
        signal_group(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(max(0.0, deadline - time.monotonic()))  # reaps the leader
    while time.monotonic() < deadline and any(_group_exists(c.pid) for c in children):
        time.sleep(0.05)
    killed = [c for c in children if c.proc.poll() is None or _group_exists(c.pid)]
    for child in killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(5)
    return killed


def _group_exists(pgid: int) -> bool:
    return _answers(os.killpg, pgid)


def spawn(role: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path | None = None,
          *, nice: int = 0, cwd: str | os.PathLike | None = None) -> Child:
    """Start ``argv`` in a session of its own; its output goes to ``log_path`` (appended) or
    to ours."""
    log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
    try:
        # preexec_fn with threads running in the parent (test servers, the benchmark's image
        # server) is safe here: the child only calls nice and prctl before exec
        proc = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT if log else None,
                                preexec_fn=_child_setup(os.getpid(), nice))  # noqa: PLW1509
    finally:
        if log is not None:
            log.close()  # the child holds its own copy
    logger.info("started %s (pid %d): %s", role, proc.pid, " ".join(argv[1:]))
    return Child(role, proc, log_path)


def wait_until(ready: Callable[[], bool], what: str, timeout_s: float,
               children: Sequence[Child] = (), interval_s: float = 0.1) -> None:
    """Poll ``ready()`` until it is true.

    Raises:
        ChildExitedError: one of ``children`` ended meanwhile.
        TimeoutError: ``timeout_s`` passed; names ``what`` and shows the children's logs.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        for child in children:
            child.check_alive()
        if ready():
            return
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {c.role} ({c.log_path}):\n{c.log_tail()}"
                            for c in children if c.log_path)
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s{tails}")
        time.sleep(interval_s)
