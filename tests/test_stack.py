"""The local stack (``python -m ml_backend.stack``): its banner and bind refusal, one real run with
the embedded server (ready, a brush mask for the captured interactive request, nothing left
running after Ctrl-C) and a run that heals (killed children and Valkey come back)."""

from __future__ import annotations

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
from pathlib import Path

import pytest

from ml_backend import model_choice, processes, stack
from ml_backend.settings import Settings
from tests.ml_backend.conftest import REPO, FakeLabelStudio, fake_ls, load_fixture  # noqa: F401

READY_TIMEOUT_S = 120


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------- the banner and binding


def test_banner_names_the_url_and_label_studio_settings():
    text = stack.banner("0.0.0.0", 9090, "redis://127.0.0.1:16379/1", True, Path(".cache/stack"),
                        {"workers": 1, "model_version": "v"}, model_choice.ModelChoice({}, "", False), 1)
    assert "http://localhost:9090" in text and "ready" in text
    assert "LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false" in text
    assert "LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false" in text
    assert "trainer: 1 (1 CPU thread(s)" in text
    without = stack.banner("0.0.0.0", 9090, "redis://127.0.0.1:16379/1", True,
                           Path(".cache/stack"), {"workers": 1, "model_version": "v"},
                           model_choice.ModelChoice({}, "", False), None)
    assert "trainer: none (--no-trainer): 'Start training' answers 503" in without


def test_beyond_loopback_the_stack_needs_auth_or_an_explicit_opt_out():
    off = Settings.from_env({})
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert stack.bind_refusal(host, off, False) is None, host
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        refusal = stack.bind_refusal(host, off, False)
        assert refusal and "BASIC_AUTH_USER" in refusal and "--insecure-no-auth" in refusal
        assert stack.bind_refusal(host, off, True) is None
    for auth in ({"API_TOKEN": "t"}, {"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "p"}):
        assert stack.bind_refusal("0.0.0.0", Settings.from_env(auth), False) is None
    assert stack.build_parser().parse_args([]).host == "127.0.0.1"


def test_the_stack_refuses_to_listen_on_all_addresses_without_auth(tmp_path, caplog):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDIS_URL", "BASIC_AUTH_", "API_TOKEN"))}
    data_dir = tmp_path / "stack"
    with caplog.at_level(logging.ERROR):
        code = stack.main(["--host", "0.0.0.0", "--port", str(processes.free_port()),
                           "--data-dir", str(data_dir)], env)
    assert code == 3 and "refusing to listen on 0.0.0.0 with auth off" in caplog.text
    assert not (data_dir / stack.STATE_FILE).exists()  # nothing was started


def test_the_banner_says_what_label_studios_settings_expose():
    text = stack.banner("127.0.0.1", 9090, "redis://127.0.0.1:16379/1", True,
                        Path(".cache/stack"), {"workers": 1, "model_version": "v"},
                        model_choice.ModelChoice({}, "", False), 1)
    assert "loopback only" in text and "--host 0.0.0.0 with BASIC_AUTH_USER" in text
    assert "reach any private address" in text


def test_banner_flags_an_untrained_text_branch():
    text = stack.banner("0.0.0.0", 9090, "redis://127.0.0.1:16379/1", True, Path(".cache/stack"),
                        {"workers": 1, "model_version": "talk2sam-vit_b-base-untrained-text"},
                        model_choice.ModelChoice({}, "", False), 1)
    assert "[UNTRAINED TEXT BRANCH]" in text and "From base to trained" in text
    trained = stack.banner("0.0.0.0", 9090, "redis://127.0.0.1:16379/1", True,
                           Path(".cache/stack"), {"workers": 1, "model_version": "v3"},
                           model_choice.ModelChoice({}, "", False), 1)
    assert "UNTRAINED" not in trained


# ---------------------------------------------------------------- a real run


@pytest.fixture
def running_stack(fake_ls: FakeLabelStudio, tmp_path):  # noqa: F811 - the imported fixture
    port, redis_port = processes.free_port(), processes.free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDIS_URL", "LABEL_STUDIO_", "MODEL", "BASIC_AUTH_"))}
    env.update({"LABEL_STUDIO_URL": fake_ls.url, "LABEL_STUDIO_API_KEY": fake_ls.token,
                "MODEL_DIR": str(tmp_path / "weights"), "WORKER_HEARTBEAT_TTL_S": "2",
                "JOB_TIMEOUT_S": "60", "PYTHONPATH": str(REPO)})
    data_dir = tmp_path / "stack"
    log_path = tmp_path / "stack.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ml_backend.stack", "--host", "127.0.0.1", "--port", str(port),
             "--redis-port", str(redis_port), "--data-dir", str(data_dir)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    run = {"proc": proc, "port": port, "redis_port": redis_port, "data_dir": data_dir,
           "log": lambda: log_path.read_text(errors="replace")}
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "ready:" not in run["log"]():
            assert proc.poll() is None, f"stack exited:\n{run['log']()[-4000:]}"
            assert time.monotonic() < deadline, f"stack not ready:\n{run['log']()[-4000:]}"
            time.sleep(0.3)
        run["state"] = json.loads((data_dir / stack.STATE_FILE).read_text())
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        state = run.get("state") or {}
        leftovers = [p for p in [state.get("server_pid"), *state.get("children", [])]
                     if p and processes.pid_alive(p)]
        processes.stop_pids(leftovers, 5.0)


def test_stack_serves_a_brush_and_stops_everything_on_ctrl_c(running_stack):
    proc, state = running_stack["proc"], running_stack["state"]
    pids = [state["server_pid"], *state["children"]]
    assert len(pids) == 4 and all(processes.pid_alive(p) for p in pids)  # Redis, worker, trainer, app
    log = running_stack["log"]()
    assert "embedded Valkey" in log and "trainer: 1 (" in log
    trainer_pid = state["children"][1]
    assert "ml_backend.trainer" in processes.command_line(trainer_pid)
    assert os.getpriority(os.PRIO_PROCESS, trainer_pid) >= stack.TRAINER_NICE  # yields the CPU
    assert (running_stack["data_dir"] / "versions" / "versions.json").is_file()  # registered

    request = urllib.request.Request(
        f"http://127.0.0.1:{running_stack['port']}/predict",
        data=json.dumps(load_fixture("predict_interactive_request.json")).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=90) as response:
        body = json.loads(response.read())
    (prediction,) = body["results"]
    (item,) = prediction["result"]
    assert item["type"] == "brushlabels" and item["value"]["brushlabels"] == ["wire"]
    assert item["value"]["format"] == "rle" and len(item["value"]["rle"]) > 0
    assert (item["original_width"], item["original_height"]) == (400, 300)

    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0, running_stack["log"]()[-4000:]
    assert not [p for p in pids if processes.pid_alive(p)]
    assert not port_open(running_stack["port"]) and not port_open(running_stack["redis_port"])
    assert not (running_stack["data_dir"] / stack.STATE_FILE).exists()
    assert (running_stack["data_dir"] / "appendonlydir").is_dir()  # AOF persistence was on


# ---------------------------------------------------------------- a stack that heals


def get_health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def wait_health(port: int, want: int, timeout_s: float, log) -> float:
    """Seconds until /health answers ``want`` (200 with a live worker, or 503)."""
    started = time.monotonic()
    while True:
        status, body = get_health(port)
        if status == want and (want != 200 or body.get("workers", 0) >= 1):
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, \
            f"/health not {want} after {timeout_s} s: {status} {body}\n{log()[-4000:]}"
        time.sleep(0.05)


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=90) as response:
        return json.loads(response.read())


def test_a_killed_worker_and_a_killed_valkey_come_back_and_nothing_recorded_is_lost(
        running_stack):
    import redis

    proc, port = running_stack["proc"], running_stack["port"]
    data_dir, log = running_stack["data_dir"], running_stack["log"]
    assert data_dir.stat().st_mode & 0o777 == 0o700  # the AOF is for this user's eyes only
    setup = load_fixture("setup_request.json")
    post(port, "/setup", {"project": setup["project"], "schema": setup["schema"]})
    created = load_fixture("webhook_annotation_created.json")
    assert post(port, "/webhook", created)["status"] == "recorded"
    client = redis.Redis.from_url(f"redis://127.0.0.1:{running_stack['redis_port']}/1")
    keys = stack_keys()
    before = {"annotations": client.hlen(keys.annotations),
              "projects": client.hlen(keys.projects), "serving": client.get(keys.serving)}
    assert before["annotations"] == 1 and before["projects"] == 1 and before["serving"]

    worker = running_stack["state"]["children"][0]
    assert "ml_backend.worker" in processes.command_line(worker)
    os.kill(worker, signal.SIGKILL)
    down_s = wait_health(port, 503, 30, log)  # its heartbeat expires: no live worker
    up_s = wait_health(port, 200, 60, log)
    restarted = json.loads((data_dir / stack.STATE_FILE).read_text())["children"][0]
    assert restarted != worker and processes.pid_alive(restarted)
    (prediction,) = post(port, "/predict",
                         load_fixture("predict_interactive_request.json"))["results"]
    assert prediction["result"][0]["value"]["brushlabels"] == ["wire"]

    time.sleep(1.5)  # the AOF is fsynced every second
    server = running_stack["state"]["server_pid"]
    os.kill(server, signal.SIGKILL)
    redis_down_s = wait_health(port, 503, 30, log)
    redis_up_s = wait_health(port, 200, 60, log)
    print(f"\nheal: worker killed: /health 503 after {down_s:.1f} s, UP after {up_s:.1f} s "
          f"more; Valkey killed: 503 after {redis_down_s:.1f} s, UP after {redis_up_s:.1f} s")
    assert proc.poll() is None
    after = {"annotations": client.hlen(keys.annotations),
             "projects": client.hlen(keys.projects), "serving": client.get(keys.serving)}
    assert after == before
    (prediction,) = post(port, "/predict",
                         load_fixture("predict_interactive_request.json"))["results"]
    assert prediction["result"][0]["value"]["brushlabels"] == ["wire"]
    assert "restarting it in" in log() and "embedded Valkey restarted" in log()


def stack_keys():
    from ml_backend.schemas import RedisKeys

    return RedisKeys()
