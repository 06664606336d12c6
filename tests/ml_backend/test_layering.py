"""ml_backend's layers point down only: app -> model -> ls_protocol -> queue_client -> worker ->
talk2sam. schemas, errors and settings sit under all of them; the web side never imports torch."""

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
    "settings": set(),
    "stack": {"settings"},
    "schemas": set(),
    "errors": set(),
    "images": {"errors"},
    "ls_protocol": {"errors"},
    "queue_client": {"errors", "schemas", "settings"},
    "versions": {"schemas"},
    "annotations": {"schemas"},
    "trainer": {"annotations", "errors", "images", "ls_protocol", "schemas", "settings",
                "versions"},
    "worker": {"errors", "images", "schemas", "settings", "versions"},
    "model": {"annotations", "errors", "ls_protocol", "queue_client", "schemas", "settings",
              "trainer", "versions"},
    "app": {"annotations", "errors", "ls_protocol", "model", "queue_client", "settings",
            "trainer"},
}


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


def test_web_process_does_not_import_torch():
    code = "import sys, ml_backend.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
