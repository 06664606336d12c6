"""A picture of Label Studio's editor showing the backend's answers: polygons of a wire (the
polygon config) and the regions text alone found (the find config).

It starts what the end-to-end tests start (a Label Studio 1.23.2 from `.venv-labelstudio`, the
backend and one worker serving the shipped demo; Redis on REDIS_URL, default 127.0.0.1:6379/13),
asks the backend as the editor does, stores the answers as the tasks' predictions, opens each
task in headless Chromium and saves a screenshot.

Needs Chromium (Debian: `apt-get install chromium`) and Playwright's Python package
(`.venv/bin/pip install playwright`; it drives the system Chromium, nothing is downloaded).

Usage: .venv/bin/python scripts/screenshot_editor.py [--out docs/figures] [--chromium PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: make the project importable
    sys.path.insert(0, str(REPO))

from label_studio_sdk import LabelStudio

from ml_backend.processes import free_port, spawn, wait_until
from tests.e2e.harness import LABELING_CONFIGS, backend_env, start_label_studio, workers_live
from tests.e2e.synthetic_images import make_wire_image, make_wires_image

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "docs" / "figures"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        parser.error("needs Playwright's Python package: .venv/bin/pip install playwright")
    if not Path(args.chromium).is_file():
        parser.error(f"no Chromium at {args.chromium} (apt-get install chromium, or --chromium)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        server = start_label_studio(work_dir)
        env = backend_env(server, os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13"))
        port = free_port()
        worker = spawn("worker", [sys.executable, "-m", "ml_backend.worker"], env,
                       work_dir / "worker.log", cwd=REPO)
        app = spawn("backend", [sys.executable, "-m", "ml_backend.app", "--host", "127.0.0.1",
                                "--port", str(port)], env, work_dir / "app.log", cwd=REPO)
        backend_url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: workers_live(backend_url) >= 1, "the backend with a worker", 600,
                       [app, worker])
            client = LabelStudio(base_url=server.url, api_key=server.token, timeout=120)
            pages = [polygon_task(client, server, backend_url),
                     text_alone_task(client, server, backend_url)]
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium,
                                                     args=CHROMIUM_FLAGS)
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"{server.url}/user/login")
                page.fill("input[name=email]", server.username)
                page.fill("input[name=password]", server.password)
                page.click("button[type=submit]")
                try:
                    page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)
                except Exception:
                    page.screenshot(path=str(out / "login_failed.png"))
                    raise
                for name, url in pages:
                    page.goto(url)
                    page.wait_for_selector("canvas", timeout=120_000)
                    time.sleep(5)  # the image loads and the regions draw after the canvas
                    path = out / name
                    page.screenshot(path=str(path))
                    print(f"wrote {path}")
                browser.close()
        finally:
            for child in (app, worker, server.service):
                child.stop()
    return 0


def connected_project(client: LabelStudio, config: str, title: str, backend_url: str
                      ) -> tuple[int, int]:
    project = client.projects.create(title=title,
                                     label_config=(LABELING_CONFIGS / config).read_text())
    ml = client.ml.create(project=project.id, url=backend_url, is_interactive=True)
    return int(project.id), int(ml.id)


def import_task(client: LabelStudio, server, project_id: int, path: Path) -> int:
    client.import_storage.local.create(project=project_id, path=str(path.parent),
                                       use_blob_urls=True, title="pictures")
    done = client.projects.import_tasks(project_id, request=[{"image": server.local_file_url(path)}],
                                        return_task_ids=True)
    return int(done.task_ids[0])


def store_prediction(client: LabelStudio, ml_id: int, task_id: int, context: dict) -> None:
    """Ask as the editor asks, and keep the prompt and the answer as the task's prediction
    (the editor shows a task's prediction when it opens it)."""
    raw = client.ml.with_raw_response.predict_interactive(ml_id, task=task_id, context=context)
    answer = raw._response.json()["data"]
    client.predictions.create(task=task_id, result=context["result"] + answer["result"],
                              score=answer["score"], model_version=answer["model_version"])


def polygon_task(client: LabelStudio, server, backend_url: str) -> tuple[str, str]:
    project_id, ml_id = connected_project(client, "wires_polygons.xml", "Polygons", backend_url)
    image = make_wire_image(server.files_root / "poly" / "wire.png", 7, 800, 560,
                            line_width_px=4, margin_px=16)
    task_id = import_task(client, server, project_id, image.path)
    box = {"id": "b1", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
           "original_width": image.width, "original_height": image.height,
           "value": {**image.box_pct, "rectanglelabels": ["Power line"]}}
    store_prediction(client, ml_id, task_id, {"result": [box]})
    return "editor_polygons.png", f"{server.url}/projects/{project_id}/data?task={task_id}"


def text_alone_task(client: LabelStudio, server, backend_url: str) -> tuple[str, str]:
    project_id, ml_id = connected_project(client, "thin_structures_find.xml", "Text alone",
                                          backend_url)
    image = make_wires_image(server.files_root / "find" / "three.png", 3, width=800, height=600,
                             line_width_px=4, ground=False)
    task_id = import_task(client, server, project_id, image.path)
    choice = {"id": "f1", "from_name": "find", "to_name": "image", "type": "choices",
              "value": {"choices": ["Wire"]}}
    store_prediction(client, ml_id, task_id, {"result": [choice]})
    return "editor_text_alone.png", f"{server.url}/projects/{project_id}/data?task={task_id}"


if __name__ == "__main__":
    sys.exit(main())
