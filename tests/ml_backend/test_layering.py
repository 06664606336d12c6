"""ml_backend's layers point down only: app -> model -> ls_protocol -> queue_client -> worker ->
talk2sam. schemas, errors and settings sit under all of them; the web side never imports torch,
the trainer or talk2sam's data code (it asks for training through training_queue only)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ml_backend.conftest import REPO

PACKAGE = REPO / "ml_backend"
# Each module may import only the ml_backend modules listed (and anything outside the package).
ALLOWED = {
    "settings": {"errors"},
    "processes": {"errors"},
    "embedded_redis": {"errors", "processes"},
    "model_choice": set(),
    "supervision": {"errors", "processes"},
    "stack": {"embedded_redis", "errors", "model_choice", "processes", "schemas", "settings",
              "supervision", "training_queue"},
    "schemas": set(),
    "errors": set(),
    "image_urls": {"errors", "settings"},
    "ls_auth": {"errors", "image_urls"},
    "images": {"errors", "image_urls", "ls_auth", "settings"},
    "ls_format": {"errors"},
    "ls_export": {"errors", "ls_format"},
    "label_config": {"errors"},
    "ls_protocol": {"errors", "label_config", "ls_format"},
    "ls_results": {"label_config", "ls_format"},
    "queue_client": {"errors", "schemas", "settings"},
    "versions": {"errors", "schemas"},
    "annotations": {"errors", "ls_format", "projects", "schemas"},
    "heartbeat": set(),
    "tokens": {"schemas"},
    "rq_process": {"heartbeat", "settings"},
    "training_queue": {"errors", "heartbeat", "schemas", "settings", "versions"},
    "serving_model": {"errors", "settings", "versions"},
    "training_data": {"ls_format"},
    "promotion": {"errors", "settings"},
    "trainer": {"annotations", "errors", "images", "ls_export", "ls_protocol", "promotion",
                "rq_process", "schemas", "serving_model", "settings", "tokens", "training_data",
                "training_queue", "versions"},
    "worker_model": {"errors", "serving_model", "settings", "versions"},
    "project_heads": {"settings", "versions"},
    "worker": {"errors", "heartbeat", "images", "ls_format", "project_heads", "rq_process",
               "schemas", "serving_model", "settings", "tokens", "versions", "worker_model"},
    "projects": {"errors", "label_config", "ls_protocol", "schemas"},
    "predict_jobs": {"errors", "label_config", "ls_protocol", "ls_results", "projects",
                     "schemas"},
    "model": {"annotations", "errors", "label_config", "ls_protocol", "predict_jobs", "projects",
              "promotion", "queue_client", "schemas", "settings", "tokens", "training_queue",
              "versions"},
    "metrics": {"errors", "queue_client", "training_queue"},
    "app": {"errors", "ls_protocol", "metrics", "model", "queue_client", "settings"},
    # the benchmark's processes and tables run the whole service from above
    "bench_stack": {"processes", "schemas", "stack"},
    "bench_service": {"bench_stack", "processes", "queue_client", "schemas", "settings",
                      "versions", "worker", "worker_model"},
}
# Modules the request-handling process must never load: the web side is torch-free and leaves
# decoding masks, pairing them with boxes and training to the trainer process.
WEB_FORBIDDEN = ("torch", "ml_backend.trainer", "ml_backend.worker", "talk2sam.data")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_point_down(module):
    ours = {n.split(".")[1] for n in imported_modules(PACKAGE / f"{module}.py")
            if n.startswith("ml_backend.")}
    ours.discard(module)
    assert ours <= ALLOWED[module], f"{module} imports {sorted(ours - ALLOWED[module])}"


def test_every_module_is_placed():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules <= set(ALLOWED)


def test_web_process_imports_neither_torch_nor_the_trainer_nor_data_code():
    """Serve a webhook and a START_TRAINING in a fresh process, then list what got imported."""
    code = """
import sys
from fastapi.testclient import TestClient
from ml_backend.app import create_app
from ml_backend.settings import Settings
app = create_app(Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1/1"}))
with TestClient(app) as client:
    client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": 1}})
    client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
print(sorted({m for m in sys.modules for f in %r if m == f or m.startswith(f + ".")}))
""" % (WEB_FORBIDDEN,)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
