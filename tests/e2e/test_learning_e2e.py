"""The learning loop under the README's main command, with a real Label Studio 1.23.2.

`talk2sam-stack` runs with its defaults (embedded Redis, the demo model, one worker, one trainer;
no LABEL_STUDIO_URL: it learns Label Studio's address and token from /setup). Corrected brush
annotations of some tasks are saved through Label Studio's API (its webhook delivers them to the
backend), *Start training* is pressed through Label Studio, and the promoted version must segment
*other* tasks (never trained on, never held out by the trainer) better than the version that
served before: IoU against the drawn wires, through Label Studio's interactive predictions.

Run with ``pytest -m e2e tests/e2e`` (see ``conftest.py`` for what it starts).
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from ml_backend.annotations import AnnotationStore
from ml_backend.ls_export import LabelStudioExportDataset
from ml_backend.ls_format import mask_to_polygons, points_px_to_pct
from ml_backend.schemas import RedisKeys
from ml_backend.training_data import fetch_project_tasks
from tests.e2e.harness import REPO_ROOT, LabelStudioServer, StackRun, start_stack, wait_until
from tests.e2e.synthetic_images import WireImage, make_wire_image
from tests.e2e.test_label_studio_e2e import (
    LOWER_CASE_CONFIG,
    brush_items,
    import_local_files,
    predict_interactive,
    rectangle,
)

pytestmark = pytest.mark.e2e

PROMOTION_WAIT_S = 240  # what a user waits after pressing Start training
SIZES = ((400, 300), (520, 380), (360, 480), (640, 360))


def sky_wires(root: Path, prefix: str, seeds: Sequence[int]) -> list[WireImage]:
    """Sagging wires over a sky, a fence below, in several sizes (not the demo's generator)."""
    return [make_wire_image(root / f"{prefix}_{seed}.png", seed, *SIZES[i % len(SIZES)])
            for i, seed in enumerate(seeds)]


def corrected_brush(image: WireImage, region_id: str) -> dict[str, Any]:
    """The wire painted with the brush, as the editor saves it (Label Studio's RLE)."""
    return {"id": region_id, "from_name": "mask", "to_name": "image", "type": "brushlabels",
            "origin": "manual", "original_width": image.width, "original_height": image.height,
            "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(image.mask.astype(np.uint8) * 255),
                      "brushlabels": ["wire"]}}


def corrected_polygon(image: WireImage, region_id: str) -> dict[str, Any]:
    """The wire outlined with the polygon tool, as the editor saves it (percent points)."""
    outline = max(mask_to_polygons(image.mask), key=len)  # the wire's largest part
    return {"id": region_id, "from_name": "outline", "to_name": "image", "type": "polygonlabels",
            "origin": "manual", "original_width": image.width, "original_height": image.height,
            "image_rotation": 0,
            "value": {"points": points_px_to_pct(outline, image.width, image.height),
                      "closed": True, "polygonlabels": ["wire"]}}


def served_iou(client: LabelStudio, ml_id: int, task_id: int, image: WireImage
               ) -> tuple[float, str]:
    """IoU of the mask Label Studio gets for a box around the wire, and its model_version."""
    data = predict_interactive(client, ml_id, task_id,
                               {"result": [rectangle(image, "wire", f"q{task_id}")]})
    (item,) = brush_items(data["result"])
    alpha = np.reshape(decode_rle(item["value"]["rle"]), (image.height, image.width, 4))[..., 3]
    mask = alpha > 0
    union = np.count_nonzero(mask | image.mask)
    return np.count_nonzero(mask & image.mask) / union, data["model_version"]


def setup_version(stack: StackRun, project_id: int) -> str:
    answer = httpx.post(f"{stack.url}/setup", json={"project": f"{project_id}.0"}, timeout=5)
    return answer.json()["model_version"]


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"\b(ERROR|CRITICAL|Traceback)\b", line)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackRun]:
    """The README's main command, nothing set but where its data goes and one minimum: eight
    corrected one-wire tasks hold out three (PROMOTE_MIN_HELDOUT_TASKS, default 3), so
    PROMOTE_MIN_HELDOUT_OBJECTS comes down from 5 to the three objects they hold."""
    run = start_stack(tmp_path_factory.mktemp("learning-stack"),
                      {"PROMOTE_MIN_HELDOUT_OBJECTS": "3"})
    try:
        yield run
    finally:
        run.stop()


FENCE_CONFIG = LOWER_CASE_CONFIG.replace('<Label value="wire"/>', "")  # fence, bicycle


def served_masks(client: LabelStudio, ml_id: int, task_ids: Sequence[int],
                 images: Sequence[WireImage], label: str) -> tuple[list[list[int]], set[str]]:
    """The brush RLE Label Studio gets for a box on each image, and the model_versions."""
    masks, versions = [], set()
    for task_id, image in zip(task_ids, images):
        data = predict_interactive(client, ml_id, task_id,
                                   {"result": [rectangle(image, label, f"q{task_id}")]})
        (item,) = brush_items(data["result"])
        masks.append(item["value"]["rle"])
        versions.add(data["model_version"])
    assert all(any(rle) for rle in masks)
    return masks, versions


def test_start_training_on_one_project_changes_that_project_only(
        label_studio: LabelStudioServer, ls_client: LabelStudio, stack: StackRun) -> None:
    """Projects A (wire) and B (fence, bicycle) on one stack; eight corrections on A and *Start
    training* on A: A's model_version changes and its masks of other tasks improve; B keeps its
    model_version and its masks, bit for bit."""
    project_a = int(ls_client.projects.create(title="e2e learning A",
                                              label_config=LOWER_CASE_CONFIG).id)
    project_b = int(ls_client.projects.create(title="e2e learning B",
                                              label_config=FENCE_CONFIG).id)
    root = label_studio.files_root / "learning"
    corrected = sky_wires(root, "corrected", range(300, 308))
    others = sky_wires(root, "other", range(400, 406))
    task_ids = import_local_files(ls_client, label_studio, project_a, corrected + others)
    corrected_ids, other_ids = task_ids[:len(corrected)], task_ids[len(corrected):]
    b_images = sky_wires(root, "b", range(500, 504))
    b_ids = import_local_files(ls_client, label_studio, project_b, b_images)
    ml_id = int(ls_client.ml.create(project=project_a, url=stack.url, is_interactive=True,
                                    title="talk2sam stack").id)
    ml_b = int(ls_client.ml.create(project=project_b, url=stack.url, is_interactive=True,
                                   title="talk2sam stack").id)
    before_version = setup_version(stack, project_a)
    before = [served_iou(ls_client, ml_id, t, img) for t, img in zip(other_ids, others)]
    assert {v for _, v in before} == {before_version}
    b_before, b_versions = served_masks(ls_client, ml_b, b_ids, b_images, "fence")
    assert b_versions == {setup_version(stack, project_b)} == {before_version}

    for task_id, image in zip(corrected_ids, corrected):
        ls_client.annotations.create(task_id, project=project_a, result=[
            rectangle(image, "wire", f"r{task_id}"), corrected_brush(image, f"m{task_id}")])
    client = redis.Redis.from_url(stack.redis_url())
    keys = RedisKeys()
    wait_until(lambda: client.hlen(keys.annotations) == len(corrected),
               "annotations recorded from Label Studio's webhook", 30, [stack.service])

    pressed = time.monotonic()
    ls_client.ml.train(ml_id)
    assert ls_client.ml.get(ml_id).state not in ("ER", "ERROR"), ls_client.ml.get(ml_id)
    wait_until(lambda: setup_version(stack, project_a) != before_version,
               f"a new model_version within {PROMOTION_WAIT_S} s of Start training",
               PROMOTION_WAIT_S, [stack.service], interval_s=2.0)
    waited = time.monotonic() - pressed
    new_version = setup_version(stack, project_a)

    after = [served_iou(ls_client, ml_id, t, img) for t, img in zip(other_ids, others)]
    assert {v for _, v in after} == {new_version}
    iou_before = float(np.mean([iou for iou, _ in before]))
    iou_after = float(np.mean([iou for iou, _ in after]))
    progress = json.loads(client.get(keys.train_progress))
    print(f"\nStart training on A -> {new_version} served after {waited:.0f} s; IoU on "
          f"{len(others)} other tasks of A: {iou_before:.3f} ({before_version}) -> "
          f"{iou_after:.3f}; per task before {[round(i, 3) for i, _ in before]} after "
          f"{[round(i, 3) for i, _ in after]}; gate: {progress['metrics']['gain_interval']}")
    assert iou_after > iou_before, (before, after)  # a version that lowers them is not served

    b_after, b_versions = served_masks(ls_client, ml_b, b_ids, b_images, "fence")
    assert b_versions == {setup_version(stack, project_b)} == {before_version}
    assert b_after == b_before  # project B: the same masks, bit for bit

    assert progress["result"] == "promoted" and progress["metrics"]["source"] == "label-studio"
    assert progress["metrics"]["heldout_objects"] >= 3 and progress["metrics"]["heldout_tasks"] >= 3
    assert progress["metrics"]["gain"]["low"] > 0
    assert progress["metrics"]["new"]["miou"] > progress["metrics"]["old"]["miou"]
    metrics = httpx.get(f"{stack.url}/metrics", timeout=5).text
    assert re.search(rf'talk2sam_project_serving_version{{project="[^"]+#{project_a}",'
                     rf'version="{new_version}"}} 1', metrics), metrics
    assert f'talk2sam_serving_version{{version="{before_version}"}} 1' in metrics
    status = subprocess.run(
        [sys.executable, "scripts/versions.py", "status"], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=60, env={"REDIS_URL": stack.redis_url(), "PATH": "/usr/bin:/bin",
                                    "PYTHONPATH": str(REPO_ROOT),
                                    "VERSIONS_DIR": str(stack.data_dir / "versions")})
    assert f"serving: {before_version}" in status.stdout, status.stdout + status.stderr
    assert re.search(rf"project \S+#{project_a}: serves {new_version}", status.stdout)
    assert re.search(rf"project \S+#{project_a}: promoted {new_version} \(held-out mIoU",
                     status.stdout), status.stdout
    ranked = subprocess.run(  # active learning ranks A's tasks by A's own version
        [sys.executable, "scripts/select_next_batch.py", "--project", str(project_a), "-n", "3",
         "--url", label_studio.url, "--api-key", label_studio.token], cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=120)
    assert f"ranking by predictions of {new_version}" in ranked.stdout, ranked.stdout + \
        ranked.stderr
    log = stack.service.log_path.read_text(errors="replace")
    assert "training job" in log and "epoch" in log  # progress reached the stack's log
    assert error_lines(log) == [], error_lines(log)
    ls_client.projects.delete(project_a)
    ls_client.projects.delete(project_b)


def test_start_training_on_one_annotated_task_shows_why_on_the_model_card(
        label_studio: LabelStudioServer, ls_client: LabelStudio, stack: StackRun) -> None:
    project_id = int(ls_client.projects.create(title="e2e one task",
                                               label_config=LOWER_CASE_CONFIG).id)
    images = sky_wires(label_studio.files_root / "learning", "one", range(600, 602))
    task_ids = import_local_files(ls_client, label_studio, project_id, images)
    ml_id = int(ls_client.ml.create(project=project_id, url=stack.url, is_interactive=True).id)
    ls_client.annotations.create(task_ids[0], project=project_id, result=[
        rectangle(images[0], "wire", "r1"), corrected_brush(images[0], "m1")])
    ls_client.ml.train(ml_id)
    state, message = ml_record(label_studio, ml_id)
    assert state == "ER" and message.startswith("422 Client Error"), (state, message)
    assert f"project-{project_id}-has-1-annotated-task;-training-needs-6" in message, message
    ls_client.projects.delete(project_id)


def ml_record(label_studio: LabelStudioServer, ml_id: int) -> tuple[str, str]:
    """The model's state and error message as Label Studio stored them. Reading the model
    through its API runs a health check that resets both, so this reads the record."""
    with sqlite3.connect(label_studio.data_dir / "label_studio.sqlite3") as db:
        return db.execute("SELECT state, error_message FROM ml_mlbackend WHERE id = ?",
                          (ml_id,)).fetchone()


def test_start_training_without_a_trainer_is_an_error_label_studio_shows(
        label_studio: LabelStudioServer, ls_client: LabelStudio,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    run = start_stack(tmp_path_factory.mktemp("no-trainer-stack"), {}, ["--no-trainer"])
    try:
        project_id = int(ls_client.projects.create(title="e2e no trainer",
                                                   label_config=LOWER_CASE_CONFIG).id)
        ml_id = int(ls_client.ml.create(project=project_id, url=run.url, is_interactive=True).id)
        ls_client.ml.train(ml_id)
        # Label Studio answers its own caller 200 whatever the backend says, and records the
        # backend's status line on the model (state ER, error_message; not the body)
        state, message = ml_record(label_studio, ml_id)
        assert state == "ER" and "503 Server Error: Service Unavailable" in message, \
            (state, message)
        assert "no-trainer-is-running" in message, message
        # the body names what is missing, in the stack's log and in /metrics
        assert "NoTrainerError no trainer is running" in run.service.log_path.read_text()
        assert "talk2sam_trainers_live 0" in httpx.get(f"{run.url}/metrics", timeout=5).text
        ls_client.projects.delete(project_id)
    finally:
        run.stop()


POLYGON_CONFIG = LOWER_CASE_CONFIG.replace("</View>", """  <PolygonLabels name="outline" toName="image">
    <Label value="wire"/>
  </PolygonLabels>
</View>""")


def test_polygon_corrections_in_label_studio_are_recorded_and_trained_on_as_its_export_holds_them(
        label_studio: LabelStudioServer, ls_client: LabelStudio, stack: StackRun) -> None:
    """Wires outlined with the polygon tool: Label Studio's webhook brings them to the backend,
    which records them, and its export (what the trainer reads) gives each wire back as a mask."""
    project_id = int(ls_client.projects.create(title="e2e polygons",
                                               label_config=POLYGON_CONFIG).id)
    images = sky_wires(label_studio.files_root / "polygons", "outlined", (500, 501, 502))
    task_ids = import_local_files(ls_client, label_studio, project_id, images)
    ls_client.ml.create(project=project_id, url=stack.url, is_interactive=True)
    setup_version(stack, project_id)
    for task_id, image in zip(task_ids, images):
        ls_client.annotations.create(task_id, project=project_id, result=[
            rectangle(image, "wire", f"r{task_id}"), corrected_polygon(image, f"p{task_id}")])
    store = AnnotationStore(redis.Redis.from_url(stack.redis_url()), RedisKeys())
    wait_until(lambda: len(store.all(project_id)) == len(images),
               "polygon annotations recorded from Label Studio's webhook", 30, [stack.service])
    for record in store.all(project_id):
        assert sorted(r["type"] for r in record.result) == ["polygonlabels", "rectanglelabels"]

    by_url = {label_studio.local_file_url(image.path): image for image in images}
    dataset = LabelStudioExportDataset(
        fetch_project_tasks(label_studio.url, label_studio.token, project_id),
        lambda url: np.asarray(Image.open(by_url[url].path).convert("RGB")))
    assert len(dataset) == len(images)
    ious = []
    for index, region in enumerate(dataset.regions):
        item, wire = dataset[index], by_url[region.image_ref].mask
        assert item["word"] == "wire"
        ious.append(np.count_nonzero(item["mask"] & wire) / np.count_nonzero(item["mask"] | wire))
    print(f"\npolygon masks from Label Studio's export against the drawn wires: IoU "
          f"{[round(i, 3) for i in ious]}")
    assert min(ious) > 0.8, ious
    ls_client.projects.delete(project_id)
