"""End-to-end harness: start a real Label Studio, the backend web app and its workers.

The fixtures in ``conftest.py`` use these pieces; every process is started in its own process
group and stopped (the whole group) at the end of the session. Nothing needs to run beforehand
except Redis (tests/conftest.py provides one).

Label Studio lives in its own virtual environment (it pins rq < 2.7 and redis < 5.3, which the
backend's environment must not get), installed from its lock by ``scripts/setup.sh
--with-label-studio``.

| variable | default | meaning |
|---|---|---|
| LABEL_STUDIO_BIN | ``.venv-labelstudio/bin/label-studio`` | the ``label-studio`` executable |
| E2E_ALLOW_SKIP | unset | ``1``: skip (instead of fail) when that executable is missing |
| E2E_REDIS_URL | database 13 of the tests' Redis | Redis database of the e2e tests (flushed) |
| E2E_CACHE_DIR | ``.cache/e2e`` | where a migrated Label Studio database is kept between sessions |
| E2E_START_TIMEOUT_S | 600 | how long Label Studio and the backend may take to become ready |

A first Label Studio start spends about a minute on database migrations; the migrated empty
database is kept in ``E2E_CACHE_DIR`` (keyed by the Label Studio version) and copied into each
session's fresh data directory, so later sessions start in about ten seconds.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest

from ml_backend.processes import Child, free_port, spawn, wait_until
from talk2sam.weights import DEMO_CHECKPOINT

REPO_ROOT = Path(__file__).resolve().parents[2]
LABELING_CONFIGS = REPO_ROOT / "labeling_configs"
LABEL_STUDIO_VERSION = "1.23.2"

# Label Studio prints this once it listens; it may have moved to another port
# (see start_label_studio).
_LISTENING = re.compile(r"Starting development server at http://[^:/]+:(\d+)/")
# Variables of the caller's environment that must not leak into a child of another venv.
_FOREIGN_ENV = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "DJANGO_SETTINGS_MODULE")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def start_timeout_s() -> float:
    return float(os.environ.get("E2E_START_TIMEOUT_S", "600"))


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a child process: ours without venv leaks, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env.update(extra)
    return env


def http_ok(url: str, headers: Mapping[str, str] | None = None) -> bool:
    try:
        return httpx.get(url, headers=dict(headers or {}), timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def workers_live(backend_url: str) -> int:
    """Live workers the backend's /health reports (0 while it is not answering)."""
    try:
        response = httpx.get(f"{backend_url}/health", timeout=2.0)
        return int(response.json().get("workers") or 0) if response.status_code == 200 else 0
    except (httpx.HTTPError, ValueError):
        return 0


# ---------------------------------------------------------------- Label Studio


@dataclass(frozen=True)
class LabelStudioServer:
    """A running Label Studio.

    Attributes:
        url: base URL, ``http://127.0.0.1:<port>``.
        token: the admin's legacy API token (``Authorization: Token ...``).
        username, password: the admin's credentials.
        data_dir: Label Studio's data directory (database, uploads).
        files_root: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: files under it are served as
            ``/data/local-files/?d=<path relative to it>``.
        service: the process.
    """

    url: str
    token: str
    username: str
    password: str
    data_dir: Path
    files_root: Path
    service: Child

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def local_file_url(self, path: Path) -> str:
        """Task URL of a file under ``files_root``."""
        return f"/data/local-files/?d={path.relative_to(self.files_root).as_posix()}"


def label_studio_bin() -> Path:
    """The ``label-studio`` executable (LABEL_STUDIO_BIN), skipping or failing when missing."""
    path = Path(os.environ.get("LABEL_STUDIO_BIN")
                or REPO_ROOT / ".venv-labelstudio" / "bin" / "label-studio")
    if path.is_file() and os.access(path, os.X_OK):
        return path
    reason = (f"Label Studio executable {path} not found: create it with `python3 -m venv "
              f".venv-labelstudio && .venv-labelstudio/bin/pip install "
              f"label-studio=={LABEL_STUDIO_VERSION}` or set LABEL_STUDIO_BIN")
    if _env_flag("E2E_ALLOW_SKIP"):
        pytest.skip(reason)
    pytest.fail(reason + " (set E2E_ALLOW_SKIP=1 to skip instead)", pytrace=False)


def _installed_version(bin_path: Path) -> str:
    python = bin_path.parent / "python"
    code = "import importlib.metadata as m; print(m.version('label-studio'))"
    out = subprocess.run([str(python), "-c", code], env=child_env({}), capture_output=True,
                         text=True, timeout=60, check=False)
    if out.returncode != 0:
        pytest.fail(f"cannot read the Label Studio version with {python}:\n{out.stderr}",
                    pytrace=False)
    return out.stdout.strip()


def _label_studio_env(data_dir: Path, files_root: Path, credentials: Mapping[str, str]
                      ) -> dict[str, str]:
    return child_env({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": credentials["username"],
        "LABEL_STUDIO_PASSWORD": credentials["password"],
        "LABEL_STUDIO_USER_TOKEN": credentials["token"],
        # Since 1.23.1 ML backends on local addresses are refused unless both are off.
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        # Offline and quiet: no PyPI version check, no analytics.
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
    })


def migrated_database(bin_path: Path, work_dir: Path) -> Path:
    """A migrated, empty Label Studio database, made once per version and kept in the cache.

    ``label-studio version`` applies the migrations and exits without creating any user.
    """
    version = _installed_version(bin_path)
    cache_dir = Path(os.environ.get("E2E_CACHE_DIR") or REPO_ROOT / ".cache" / "e2e")
    cached = cache_dir / f"label-studio-{version}-migrated.sqlite3"
    if cached.is_file():
        return cached
    scratch = work_dir / "migrate"
    scratch.mkdir()
    env = child_env({"LABEL_STUDIO_BASE_DATA_DIR": str(scratch), "LATEST_VERSION_CHECK": "false",
                     "COLLECT_ANALYTICS": "false"})
    log_path = work_dir / "label-studio-migrate.log"
    with log_path.open("wb") as log:
        done = subprocess.run([str(bin_path), "version"], env=env, cwd=work_dir, stdout=log,
                              stderr=subprocess.STDOUT, timeout=start_timeout_s(), check=False)
    database = scratch / "label_studio.sqlite3"
    if done.returncode != 0 or not database.is_file():
        pytest.fail(f"Label Studio migrations failed (code {done.returncode}):\n"
                    f"{log_path.read_text(errors='replace')[-4000:]}", pytrace=False)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f".{cached.name}.{os.getpid()}.tmp"
    shutil.copyfile(database, partial)
    os.replace(partial, cached)  # atomic: concurrent sessions never see half a file
    return cached


def start_label_studio(work_dir: Path, attempts: int = 3) -> LabelStudioServer:
    """Start Label Studio on a free port with a fresh data dir and a random admin token.

    Label Studio moves to the next port, silently, when the one asked for is taken by the time it
    binds; the port it prints is checked and a mismatch is retried on a new port, so the URL
    given to the backend (``--host``) is always the real one.
    """
    bin_path = label_studio_bin()
    template = migrated_database(bin_path, work_dir)
    credentials = {"username": "e2e@talk2sam.test", "password": secrets.token_urlsafe(12),
                   "token": secrets.token_hex(20)}
    files_root = work_dir / "files"
    files_root.mkdir()
    for attempt in range(1, attempts + 1):
        data_dir = work_dir / f"label-studio-data-{attempt}"
        data_dir.mkdir()
        shutil.copyfile(template, data_dir / "label_studio.sqlite3")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        service = spawn(
            "label-studio",
            [str(bin_path), "start", "--no-browser", "--internal-host", "127.0.0.1",
             "--port", str(port), "--host", url, "--data-dir", str(data_dir),
             "--enable-legacy-api-token"],
            _label_studio_env(data_dir, files_root, credentials),
            work_dir / f"label-studio-{attempt}.log", cwd=work_dir)
        try:
            bound = _wait_for_listen_line(service)
            if bound != port:
                service.stop()
                continue
            server = LabelStudioServer(url=url, token=credentials["token"],
                                       username=credentials["username"],
                                       password=credentials["password"], data_dir=data_dir,
                                       files_root=files_root, service=service)
            # The random token proves that this port answers for our process, not another one.
            wait_until(partial(http_ok, f"{url}/api/current-user/whoami", server.headers),
                       "Label Studio API with our token", 60, [service])
            return server
        except BaseException:
            service.stop()
            raise
    pytest.fail(f"Label Studio moved off its port {attempts} times in a row", pytrace=False)


def _wait_for_listen_line(service: Child) -> int:
    bound: list[int] = []

    def listening() -> bool:
        match = _LISTENING.search(service.log_path.read_text(errors="replace"))
        if match:
            bound.append(int(match.group(1)))
        return bool(match)

    wait_until(listening, "Label Studio", start_timeout_s(), [service])
    return bound[0]



# ---------------------------------------------------------------- Redis, backend, worker


@dataclass(frozen=True)
class Backend:
    """The backend web app and its inference workers.

    Attributes:
        url: base URL of the web app, as Label Studio reaches it.
        env: the environment both were started with (settings of ``ml_backend.settings``).
        app: the web app process.
        workers: the worker processes.
    """

    url: str
    env: Mapping[str, str]
    app: Child
    workers: tuple[Child, ...]


def backend_env(label_studio: LabelStudioServer, redis_url: str) -> dict[str, str]:
    """Settings for the app and the workers: the shipped demo model (what the local stack serves
    without real weights) on CPU."""
    return child_env({
        "REDIS_URL": redis_url,
        "KEY_PREFIX": f"talk2sam-e2e-{secrets.token_hex(4)}:",
        "VERSIONS_DIR": str(label_studio.data_dir / "backend-versions"),  # this session's own
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "MODEL": "talk2sam",
        "MODEL_CONFIG": "tiny-768",
        "MODEL_CHECKPOINT": str(DEMO_CHECKPOINT),
        "DEVICE": "cpu",
        "JOB_TIMEOUT_S": "90",
        "LABEL_PROMPTS": json.dumps({"Power line": "wire"}),
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    })


# ---------------------------------------------------------------- the local stack


@dataclass(frozen=True)
class StackRun:
    """``talk2sam-stack`` as the README starts it, with its own embedded Redis.

    Attributes:
        url: the backend's base URL.
        service: the stack process (its log holds every child's lines).
        data_dir: its ``--data-dir`` (``stack.json``, the AOF, ``versions/``).
    """

    url: str
    service: Child
    data_dir: Path

    def redis_url(self) -> str:
        """The embedded server's URL (database 1, as the stack gives its children)."""
        state = json.loads((self.data_dir / "stack.json").read_text())
        return f"redis://127.0.0.1:{state['server_port']}/1"

    def stop(self) -> None:
        self.service.proc.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            self.service.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.service.stop()


def start_stack(work_dir: Path, env: Mapping[str, str], args: Sequence[str] = ()) -> StackRun:
    """Start ``python -m ml_backend.stack`` with no REDIS_URL, no model settings and no weights
    (plus ``env``), and wait until its backend counts a live worker."""
    port = free_port()
    stack_env = child_env({"MODEL_DIR": str(work_dir / "no-weights"), "PYTHONUNBUFFERED": "1",
                           **env})
    for name in ("REDIS_URL", "MODEL_CONFIG", "MODEL_CHECKPOINT", "MODEL", "VERSIONS_DIR",
                 "KEY_PREFIX"):
        if name not in env:
            stack_env.pop(name, None)
    data_dir = work_dir / "data"
    service = spawn("stack", [sys.executable, "-m", "ml_backend.stack", "--host", "127.0.0.1",
                              "--port", str(port), "--data-dir", str(data_dir), *args],
                    stack_env, work_dir / "stack.log", cwd=REPO_ROOT)
    run = StackRun(url=f"http://127.0.0.1:{port}", service=service, data_dir=data_dir)
    try:
        wait_until(lambda: workers_live(run.url) >= 1, "the stack's backend with a live worker",
                   start_timeout_s(), [service])
    except BaseException:
        run.stop()
        raise
    return run

