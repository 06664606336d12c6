"""A Label Studio project stand-in for the trainer's tests: synthetic thin objects saved as the
editor saves rectangles and brushes, served with their images and the project's JSON export
(label-studio-sdk talks to it), and a trainer process to run against it."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from ml_backend.schemas import RedisKeys
from talk2sam.data.synthetic import SyntheticThinDataset
from tests.ml_backend.conftest import PREFIX, REPO, QuietHandler, serve_http

PROJECT = 7
TOKEN = "trainer-test-token"
N_TASKS = 6
TRAIN_WAIT_S = 180


def ls_results(item: dict, index: int) -> list[dict]:
    """A rectangle and a brush mask of the item's object, as the Label Studio editor saves them."""
    height, width = item["mask"].shape
    x0, y0, x1, y1 = (float(v) for v in item["box_xyxy"])
    common = {"original_width": width, "original_height": height, "image_rotation": 0,
              "to_name": "image"}
    rect = {**common, "id": f"r{index}", "from_name": "box", "type": "rectanglelabels",
            "value": {"x": x0 * 100 / width, "y": y0 * 100 / height,
                      "width": (x1 - x0 + 1) * 100 / width, "height": (y1 - y0 + 1) * 100 / height,
                      "rotation": 0, "rectanglelabels": [item["word"]]}}
    brush = {**common, "id": f"b{index}", "from_name": "mask", "type": "brushlabels",
             "value": {"format": "rle", "rle": mask2rle(item["mask"].astype(np.uint8) * 255),
                       "brushlabels": [item["word"]]}}
    return [rect, brush]


@dataclass
class FakeProject:
    """A Label Studio stand-in for one project: ``/data/upload/...`` images and
    ``/api/projects/<id>/export`` (set ``export_status`` to make the API fail)."""

    url: str = ""
    images: dict[str, bytes] = field(default_factory=dict)
    tasks: list[dict] = field(default_factory=list)
    export_status: int = 200
    export_calls: int = 0


@contextlib.contextmanager
def served_project() -> Iterator[FakeProject]:
    """A project of N_TASKS synthetic wire tasks, each with a rectangle and a brush mask, served
    by a Label Studio stand-in on a free port."""
    state = FakeProject()
    # the demo model's domain: it starts from the demo (as the local stack serves it), so a
    # fine-tuned child can beat box-only SAM-HQ, which promotion demands
    dataset = SyntheticThinDataset(N_TASKS, seed=3, multi_object=True, stroke_scale=3.0)
    for i in range(N_TASKS):
        item = dataset[i]
        path = f"/data/upload/{PROJECT}/synth_{i}.png"
        buffer = io.BytesIO()
        Image.fromarray(item["image"]).save(buffer, format="PNG")
        state.images[path] = buffer.getvalue()
        state.tasks.append({"id": 100 + i, "data": {"image": path}, "project": PROJECT,
                            "annotations": [{"id": 500 + i, "result": ls_results(item, i),
                                             "was_cancelled": False}]})

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != f"Token {TOKEN}":
                self.send(401, b'{"detail": "no"}', "application/json")
                return
            path = self.path.split("?")[0]
            if path in state.images:
                self.send(200, state.images[path], "image/png")
            elif path.rstrip("/") == f"/api/projects/{PROJECT}/export":
                state.export_calls += 1
                body = json.dumps(state.tasks).encode()
                self.send(state.export_status, body if state.export_status == 200 else b"{}",
                           "application/json")
            else:
                self.send(404, b"{}", "application/json")

    server, state.url = serve_http(Handler)
    yield state
    server.shutdown()


def progress(client: redis.Redis) -> dict:
    raw = client.get(RedisKeys(PREFIX).train_progress)
    return json.loads(raw) if raw else {}


def wait_for(condition, timeout_s: float, what: str, logs=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}\n{logs()}")
        time.sleep(0.1)


class Trainer:
    """One ``python -m ml_backend.trainer`` process."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str):
        self.log_path = log_path
        self.name = f"{name}-{uuid.uuid4().hex[:6]}"  # rq keeps a killed worker's name a while
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ml_backend.trainer", "--name", self.name], cwd=REPO, env=env,
                stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_live(self, client: redis.Redis) -> None:
        wait_for(lambda: client.exists(RedisKeys(PREFIX).trainer_heartbeat(self.name)), 60,
                 f"trainer {self.name} did not start", self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
