"""Keeping children alive and accounted for (ml_backend.supervision): a killed run's orphans
are stopped by the next, a running stack on the same data dir is refused, restarts back off and
give up after repeated crashes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ml_backend import processes, stack, supervision
from ml_backend.embedded_redis import EmbeddedRedis


def test_orphan_server_of_a_killed_run_is_stopped(tmp_path):
    server = EmbeddedRedis(tmp_path, processes.free_port())
    server.start()
    try:
        state = supervision.StateFile(tmp_path / stack.STATE_FILE)
        state.write(stack_pid=2**22 + 1, server_pid=server.pid, children=[])
        state.stop_leftovers()
        assert not processes.pid_alive(server.pid)
        assert not state.path.exists()
    finally:
        server.stop()


def test_a_running_stack_on_the_same_data_dir_is_refused(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              "ml_backend.stack"])
    try:
        state = supervision.StateFile(tmp_path / stack.STATE_FILE)
        state.write(stack_pid=other.pid, server_pid=None, children=[])
        with pytest.raises(supervision.StackError, match="another stack"):
            state.stop_leftovers()
        assert state.path.exists()
    finally:
        other.kill()
        other.wait()


def test_restarts_back_off_and_give_up_after_repeated_crashes():
    restarts = supervision.Restarts()
    delays = [restarts.exited(100.0 + i) for i in range(supervision.MAX_CRASHES)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert restarts.exited(110.0) is None  # the sixth exit within the window: give up
    calm = supervision.Restarts()
    for i in range(10):  # one exit every 10 minutes is forgiven every time
        assert calm.exited(i * 600.0) == 1.0
