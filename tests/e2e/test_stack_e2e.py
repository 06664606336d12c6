"""The README's path on a machine without weights: the local stack (embedded Redis-compatible
server, a worker, the backend, the shipped demo model) and a real Label Studio that connects to it
and gets masks back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from label_studio_sdk import LabelStudio

from tests.e2e.harness import LabelStudioServer, start_stack
from tests.e2e.test_label_studio_e2e import (
    assert_mask_covers_wire,
    brush_items,
    create_project,
    make_images,
    predict_interactive,
    rectangle,
    upload_images,
)

pytestmark = pytest.mark.e2e
DEMO_VERSION = "talk2sam-tiny-synthetic-demo"


@pytest.fixture(scope="module")
def stack_url(label_studio: LabelStudioServer, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[str]:
    """`talk2sam-stack` as the README starts it: no REDIS_URL, no model settings, no weights."""
    stack = start_stack(tmp_path_factory.mktemp("stack"),
                        {"LABEL_STUDIO_URL": label_studio.url,
                         "LABEL_STUDIO_API_KEY": label_studio.token})
    try:
        yield stack.url
    finally:
        stack.stop()


def test_label_studio_gets_masks_from_the_stacks_demo_model(
        label_studio: LabelStudioServer, ls_client: LabelStudio, stack_url: str) -> None:
    project_id = create_project(ls_client, "wires.xml", "stack demo")
    images = make_images(Path(label_studio.data_dir) / "generated", "stack", [30, 31])
    task_ids = upload_images(label_studio, project_id, images)
    ml = ls_client.ml.create(project=project_id, url=stack_url, is_interactive=True,
                             title="talk2sam stack")
    assert ls_client.ml.get(ml.id).state in ("CO", "CONNECTED")
    for task_id, image in zip(task_ids, images):
        data = predict_interactive(ls_client, int(ml.id), task_id,
                                   {"result": [rectangle(image, "Wire", f"s{task_id}")]})
        (item,) = brush_items(data["result"])
        assert_mask_covers_wire(item, image, "Wire")
        assert data["model_version"] == DEMO_VERSION
    ls_client.projects.delete(project_id)
