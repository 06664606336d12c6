"""Retrieve predictions over a real project with a real Label Studio 1.23.2 and one worker serving
the demo model: 200 tasks, some whose image is missing and some without any box. Every good task
gets a prediction, the bad ones are reported in the backend's log, the box-less ones get none and
are predicted once a box is added; interactive boxes keep being answered meanwhile.

Run with ``pytest -m e2e tests/e2e`` (see ``conftest.py`` for what it starts).
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from typing import Any

import httpx
import pytest
from label_studio_sdk import LabelStudio

from tests.e2e.harness import Backend, LabelStudioServer
from tests.e2e.synthetic_images import make_wire_image
from tests.e2e.test_label_studio_e2e import LOWER_CASE_CONFIG, brush_items, rectangle

pytestmark = pytest.mark.e2e

N_GOOD, N_MISSING, N_BARE = 170, 15, 15


def ours(client: LabelStudio, project_id: int, version: str) -> dict[int, list[Any]]:
    """Task id -> the results of our model's predictions on it."""
    found: dict[int, list[Any]] = {}
    for prediction in client.predictions.list(project=project_id):
        if prediction.model_version == version:
            found.setdefault(int(prediction.task), []).append(prediction.result)
    return found


def test_retrieve_predictions_over_200_tasks_isolates_bad_ones_and_skips_boxless(
        label_studio: LabelStudioServer, ls_client: LabelStudio, backend: Backend) -> None:
    project_id = int(ls_client.projects.create(title="e2e batch",
                                               label_config=LOWER_CASE_CONFIG).id)
    folder = label_studio.files_root / "batch"
    images = [make_wire_image(folder / f"b{n}.png", 500 + n) for n in range(N_GOOD + N_BARE)]
    ls_client.import_storage.local.create(project=project_id, path=str(folder),
                                          use_blob_urls=True, title="e2e batch")
    boxed = [{"data": {"image": label_studio.local_file_url(img.path)},
              "predictions": [{"model_version": "drawn boxes",
                               "result": [rectangle(img, "wire", f"r{n}")]}]}
             for n, img in enumerate(images[:N_GOOD])]
    missing = [{"data": {"image": label_studio.local_file_url(folder / f"gone{n}.png")},
                "predictions": [{"model_version": "drawn boxes",
                                 "result": [rectangle(images[0], "wire", f"g{n}")]}]}
               for n in range(N_MISSING)]
    bare = [{"data": {"image": label_studio.local_file_url(img.path)}}
            for img in images[N_GOOD:]]
    done = ls_client.projects.import_tasks(project_id, request=boxed + missing + bare,
                                           return_task_ids=True)
    task_ids = [int(t) for t in done.task_ids]
    good_ids, missing_ids = task_ids[:N_GOOD], task_ids[N_GOOD:N_GOOD + N_MISSING]
    bare_ids = task_ids[N_GOOD + N_MISSING:]
    ml_id = int(ls_client.ml.create(project=project_id, url=backend.url, is_interactive=True).id)
    version = httpx.get(f"{backend.url}/health", timeout=5).json()["model_version"]

    # an annotator keeps drawing boxes on one image while the batch runs
    latencies: list[float] = []
    stop = threading.Event()
    interactive_image = images[0]
    interactive_body = {"tasks": [{"id": good_ids[0], "data": {
        "image": label_studio.local_file_url(interactive_image.path)}}],
        "label_config": LOWER_CASE_CONFIG, "project": f"{project_id}.0",
        "params": {"context": {"result": [rectangle(interactive_image, "wire", "i")]}}}

    def annotate() -> None:
        with httpx.Client(timeout=100) as client:
            while not stop.is_set():
                started = time.monotonic()
                answer = client.post(f"{backend.url}/predict", json=interactive_body)
                if answer.status_code == 200 and brush_items(answer.json()["results"][0]["result"]):
                    latencies.append(time.monotonic() - started)
                time.sleep(1.0)

    annotator = threading.Thread(target=annotate)
    started = time.monotonic()
    annotator.start()
    try:
        ls_client.actions.create(id="retrieve_tasks_predictions", project=project_id,
                                 selected_items={"all": True})
    finally:
        stop.set()
        annotator.join(120)
    batch_s = time.monotonic() - started

    predicted = ours(ls_client, project_id, version)
    assert set(good_ids) <= set(predicted), sorted(set(good_ids) - set(predicted))[:10]
    assert all(len(brush_items(results[0])) == 1 for results in predicted.values())
    assert not set(missing_ids) & set(predicted)
    assert not set(bare_ids) & set(predicted)
    log = backend.app.log_path.read_text(errors="replace")
    # one line per request, by error type: a count and the first few task ids
    skipped = re.findall(r"ImageFetchError x(\d+) \(tasks ([\d, ]+)", log)
    assert sum(int(n) for n, _ in skipped) >= len(missing_ids), skipped
    shown = {int(i) for _, ids in skipped for i in ids.split(",") if i.strip()}
    assert shown and shown <= set(missing_ids), (shown, missing_ids)
    assert latencies, "no interactive answer during the batch"
    print(f"\nRetrieve predictions over {len(task_ids)} tasks: {batch_s:.1f} s; "
          f"{len(predicted)} predicted; interactive box during it: median "
          f"{statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
          f"(n={len(latencies)})")

    # a box added to a box-less task: the next Retrieve predictions predicts it
    task_id, image = bare_ids[0], images[N_GOOD]
    ls_client.annotations.create(task_id, project=project_id,
                                 result=[rectangle(image, "wire", "late")])
    ls_client.actions.create(id="retrieve_tasks_predictions", project=project_id,
                             selected_items={"all": False, "included": [task_id]})
    assert task_id in ours(ls_client, project_id, version)
    ls_client.projects.delete(project_id)
