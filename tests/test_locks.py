"""The environments are the locks: every package the venvs hold is the locked version, nothing is
missing or extra, and pip finds every requirement met. A release of any dependency that slipped in
(an install outside the locks, a lock edited by hand) fails here, not at a user's import."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LABEL_STUDIO_PYTHON = REPO / ".venv-labelstudio" / "bin" / "python"
# what a venv holds beside its lock: pip comes with the interpreter, talk2sam is this checkout
NOT_LOCKED = {"pip", "talk2sam"}
LOCKED_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.MULTILINE)
LIST_INSTALLED = ("import importlib.metadata as m, json; "
                  "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")


def canonical(name: str) -> str:
    """A distribution name as the Python packaging specs compare names (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock(name: str) -> dict[str, str]:
    text = (REPO / name).read_text()
    return {canonical(n): version for n, version in LOCKED_ENTRY.findall(text)}


def installed(python: Path | str) -> dict[str, str]:
    done = subprocess.run([str(python), "-c", LIST_INSTALLED], capture_output=True, text=True,
                          timeout=120, check=True)
    found = {canonical(n): version for n, version in json.loads(done.stdout).items()}
    return {n: v for n, v in found.items() if n not in NOT_LOCKED}


def label_studio_python() -> Path:
    if not LABEL_STUDIO_PYTHON.exists():
        pytest.fail(f"{LABEL_STUDIO_PYTHON} is missing: run scripts/setup.sh --with-label-studio",
                    pytrace=False)
    return LABEL_STUDIO_PYTHON


def differences(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    return sorted(f"{n}: locked {expected.get(n, 'no')}, installed {found.get(n, 'no')}"
                  for n in expected.keys() | found.keys() if expected.get(n) != found.get(n))


def test_the_locks_pin_every_entry_with_hashes() -> None:
    for name in ("requirements.lock", "requirements-cpu.lock", "requirements-labelstudio.lock"):
        entries = re.split(r"\n(?=[A-Za-z0-9])", (REPO / name).read_text().split("\n", 2)[2])
        assert len(entries) > 50, name
        for entry in entries:
            assert LOCKED_ENTRY.match(entry) and "--hash=sha256:" in entry, f"{name}: {entry}"


def test_the_project_venv_holds_exactly_its_lock() -> None:
    assert differences(lock("requirements.lock"), installed(sys.executable)) == []


def test_the_label_studio_venv_holds_exactly_its_lock() -> None:
    assert differences(lock("requirements-labelstudio.lock"),
                       installed(label_studio_python())) == []


def test_the_cpu_image_lock_is_the_same_set_less_the_cuda_build() -> None:
    full, cpu = lock("requirements.lock"), lock("requirements-cpu.lock")
    left_out = {n for n in full if n not in cpu}
    assert {"torch", "torchvision", "triton"} <= left_out
    assert all(n in ("torch", "torchvision", "triton") or n.startswith(("nvidia-", "cuda-"))
               for n in left_out), left_out
    assert all(full[n] == version for n, version in cpu.items())


def test_the_label_studio_lock_holds_a_sentry_sdk_that_label_studio_1_23_2_runs_with() -> None:
    # sentry-sdk 3 refuses Label Studio 1.23.2's `send_default_pii` option at import
    ls = lock("requirements-labelstudio.lock")
    assert ls["label-studio"] == "1.23.2"
    assert int(ls["sentry-sdk"].split(".")[0]) == 2


@pytest.mark.parametrize("venv", ["project", "label-studio"])
def test_pip_finds_every_requirement_met(venv: str) -> None:
    python = sys.executable if venv == "project" else label_studio_python()
    done = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_pinned_web_framework_has_the_host_header_fix() -> None:
    # Starlette < 1.0.1 builds request.url.path from the Host header (CVE-2026-48710): the auth
    # check could be skipped with `Host: x/health?`
    major, minor, patch = (int(p) for p in lock("requirements.lock")["starlette"].split(".")[:3])
    assert (major, minor, patch) >= (1, 0, 1)
    assert '"starlette>=1.0.1"' in (REPO / "pyproject.toml").read_text()
