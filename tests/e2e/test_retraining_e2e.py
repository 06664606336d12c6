"""Learning from corrections with a real Label Studio 1.23.2: annotations made through its API reach
the backend's webhook, "Start training" (``ml.train``) runs one fine-tuning job in a real trainer
process, the new version is promoted and the workers serve it: model_version changes.

Run with ``pytest -m e2e tests/e2e`` (see ``conftest.py`` for what it starts).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from ml_backend.schemas import RedisKeys
from tests.e2e.harness import Backend, LabelStudioServer, Service, wait_until
from talk2sam.data.synthetic import SyntheticThinDataset
from tests.e2e.synthetic_images import WireImage
from tests.e2e.test_label_studio_e2e import (
    create_project,
    predict_interactive,
    rectangle,
    upload_images,
)

pytestmark = pytest.mark.e2e

TRAIN_WAIT_S = 300
LABELS = {"wire": "Wire", "cable": "Cable"}  # synthetic class -> wires.xml label


@dataclass(frozen=True)
class CorrectedTask:
    image: WireImage
    mask: np.ndarray  # (H, W) bool, the annotator's corrected mask
    label: str


def corrected_task(directory: Path, seed: int) -> CorrectedTask:
    """A wire or a cable among other thin objects, from the synthetic generator the stack's demo
    model was trained on: promotion needs the fine-tuned child to beat box-only SAM-HQ on the
    held-out task, which the demo's child can do only on images like its training data."""
    item = SyntheticThinDataset(1, seed=seed, words=tuple(LABELS), stroke_scale=3.0)[0]
    path = directory / f"retrain_{seed}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(item["image"]).save(path)
    height, width = item["mask"].shape
    x0, y0, x1, y1 = (float(v) for v in item["box_xyxy"])
    box = (x0, y0, min(float(width), x1 + 1), min(float(height), y1 + 1))  # inclusive maxima
    return CorrectedTask(WireImage(path, width, height, box, item["mask"]), item["mask"],
                         LABELS[item["word"]])


def corrected_mask(task: CorrectedTask) -> dict[str, Any]:
    """The object painted with the brush, as Label Studio's RLE."""
    image = task.image
    return {"id": f"m{image.path.stem}", "from_name": "mask", "to_name": "image",
            "type": "brushlabels", "original_width": image.width,
            "original_height": image.height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(task.mask.astype(np.uint8) * 255),
                      "brushlabels": [task.label]}}


def health_version(backend: Backend) -> str:
    return httpx.get(f"{backend.url}/health", timeout=5).json()["model_version"]


def test_start_training_promotes_a_version_that_predictions_report(
        label_studio: LabelStudioServer, ls_client: LabelStudio, backend: Backend,
        tmp_path: Path) -> None:
    keys = RedisKeys(backend.env["KEY_PREFIX"])
    client = redis.Redis.from_url(backend.env["REDIS_URL"])
    trainer = Service.start("trainer", [sys.executable, "-m", "ml_backend.trainer"], {
        **backend.env, "VERSIONS_DIR": str(tmp_path / "versions"), "TRAIN_EPOCHS": "1",
        "TRAIN_BATCH_SIZE": "2", "TRAIN_LOSS_POINTS": "256", "PROMOTE_MIN_GAIN": "-1",
        "OMP_NUM_THREADS": "1"}, tmp_path / "trainer.log")
    project_id = create_project(ls_client, "wires.xml", "e2e retraining")
    try:
        tasks = [corrected_task(label_studio.data_dir / "generated", s) for s in range(30, 36)]
        images = [t.image for t in tasks]
        task_ids = upload_images(label_studio, project_id, images)
        ml_id = int(ls_client.ml.create(project=project_id, url=backend.url, is_interactive=True,
                                        title="talk2sam retraining").id)
        before = health_version(backend)

        for task_id, task in zip(task_ids, tasks):
            ls_client.annotations.create(task_id, project=project_id, result=[
                rectangle(task.image, task.label, f"r{task_id}"), corrected_mask(task)])
        # Label Studio posted each annotation to /webhook: they are recorded.
        wait_until(lambda: client.hlen(keys.annotations) == len(images),
                   "annotations recorded from the webhook", 30, [backend.app])
        recorded = [json.loads(v) for v in client.hvals(keys.annotations)]
        assert {r["task_id"] for r in recorded} == set(task_ids)
        assert [r["pairs"][0]["label"] for r in sorted(recorded, key=lambda r: r["task_id"])] \
            == [t.label for t in tasks]

        ls_client.ml.train(ml_id)
        ls_client.ml.train(ml_id)  # a second click while the first job waits: no duplicate

        def trained() -> bool:
            raw = client.get(keys.train_progress)
            return bool(raw) and json.loads(raw).get("state") in ("done", "failed")

        wait_until(trained, "the training job", TRAIN_WAIT_S, [trainer, backend.app])
        progress = json.loads(client.get(keys.train_progress))
        assert progress["result"] == "promoted", trainer.log_tail()
        metrics = progress["metrics"]  # it beat box-only SAM-HQ on the held-out tasks
        assert metrics["new"]["miou"] > metrics["baseline"]["miou"], metrics
        assert progress["metrics"]["source"] == "label-studio"  # fetched through the SDK
        assert metrics["train_objects"] + metrics["heldout_objects"] == len(tasks)
        new_version = progress["version"]
        assert new_version != before
        assert client.llen(f"rq:queue:{keys.train_queue}") == 0

        wait_until(lambda: health_version(backend) == new_version,
                   "workers serving the promoted version", 60, [backend.app, *backend.workers])
        setup = httpx.post(f"{backend.url}/setup", json={"project": f"{project_id}.0"}, timeout=5)
        assert setup.json()["model_version"] == new_version
        image = images[0]
        data = predict_interactive(ls_client, ml_id, task_ids[0],
                                   {"result": [rectangle(image, tasks[0].label, "again")]})
        assert data["model_version"] == new_version
    finally:
        trainer.stop()
        ls_client.projects.delete(project_id)
