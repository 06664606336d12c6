"""Learning from corrections with a real Label Studio 1.23.2: annotations made through its API reach
the backend's webhook, "Start training" (``ml.train``) runs one fine-tuning job in a real trainer
process, the new version is promoted and the workers serve it: model_version changes.

Run with ``pytest -m e2e tests/e2e`` (see ``conftest.py`` for what it starts).
"""

from __future__ import annotations

import json
import sys
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
from tests.e2e.synthetic_images import WireImage, make_wire_image
from tests.e2e.test_label_studio_e2e import (
    create_project,
    predict_interactive,
    rectangle,
    upload_images,
)

pytestmark = pytest.mark.e2e

TRAIN_WAIT_S = 300
DARK_WIRE = 90  # the wire is drawn at grey ~25-30 on a 150-220 background


def corrected_mask(image: WireImage) -> dict[str, Any]:
    """The wire painted with the brush: its dark pixels inside the box, as Label Studio's RLE."""
    grey = np.asarray(Image.open(image.path).convert("L"))
    mask = np.zeros_like(grey, dtype=np.uint8)
    x0, y0, x1, y1 = (round(v) for v in image.box_xyxy)
    mask[y0:y1, x0:x1] = np.where(grey[y0:y1, x0:x1] < DARK_WIRE, 255, 0)
    return {"id": f"m{image.path.stem}", "from_name": "mask", "to_name": "image",
            "type": "brushlabels", "original_width": image.width,
            "original_height": image.height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["Wire"]}}


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
        images = [make_wire_image(label_studio.data_dir / "generated" / f"retrain_{s}_400x300.png",
                                  s) for s in (30, 31, 32, 33)]
        task_ids = upload_images(label_studio, project_id, images)
        ml_id = int(ls_client.ml.create(project=project_id, url=backend.url, is_interactive=True,
                                        title="talk2sam retraining").id)
        before = health_version(backend)

        for task_id, image in zip(task_ids, images):
            ls_client.annotations.create(task_id, project=project_id, result=[
                rectangle(image, "Wire", f"r{task_id}"), corrected_mask(image)])
        # Label Studio posted each annotation to /webhook: they are recorded.
        wait_until(lambda: client.hlen(keys.annotations) == len(images),
                   "annotations recorded from the webhook", 30, [backend.app])
        recorded = [json.loads(v) for v in client.hvals(keys.annotations)]
        assert {r["task_id"] for r in recorded} == set(task_ids)
        assert all(r["pairs"][0]["label"] == "Wire" for r in recorded)

        ls_client.ml.train(ml_id)
        ls_client.ml.train(ml_id)  # a second click while the first job waits: no duplicate

        def trained() -> bool:
            raw = client.get(keys.train_progress)
            return bool(raw) and json.loads(raw).get("state") in ("done", "failed")

        wait_until(trained, "the training job", TRAIN_WAIT_S, [trainer, backend.app])
        progress = json.loads(client.get(keys.train_progress))
        assert progress["result"] == "promoted", trainer.log_tail()
        assert progress["metrics"]["source"] == "label-studio"  # fetched through the SDK
        assert progress["metrics"]["train_objects"] + progress["metrics"]["heldout_objects"] == 4
        new_version = progress["version"]
        assert new_version != before
        assert client.llen(f"rq:queue:{keys.train_queue}") == 0

        wait_until(lambda: health_version(backend) == new_version,
                   "workers serving the promoted version", 60, [backend.app, *backend.workers])
        setup = httpx.post(f"{backend.url}/setup", json={"project": f"{project_id}.0"}, timeout=5)
        assert setup.json()["model_version"] == new_version
        image = images[0]
        data = predict_interactive(ls_client, ml_id, task_ids[0],
                                   {"result": [rectangle(image, "Wire", "again")]})
        assert data["model_version"] == new_version
    finally:
        trainer.stop()
        ls_client.projects.delete(project_id)
