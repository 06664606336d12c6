"""A real Label Studio 1.23.2 talking to the backend: configs, imports, interactive and batch
predictions, masks checked pixel by pixel.

Run with ``pytest -m e2e tests/e2e`` (see ``conftest.py`` for what it starts and its settings).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from tests.e2e.harness import LABELING_CONFIGS, Backend, LabelStudioServer
from tests.e2e.synthetic_images import WireImage, make_wire_image

pytestmark = pytest.mark.e2e

# A mask pixel may stick out of its box by this much: the box is converted percent -> pixels,
# clipped and the mask resized between frames, each of which may round by a pixel.
MASK_MARGIN_PX = 2
# share of the drawn wire's pixels every mask must cover (an empty or misplaced mask covers
# nothing), and what the masks of one test cover on average (the demo model's held-out aim)
MIN_WIRE_COVERAGE = 0.1
MEAN_WIRE_COVERAGE = 0.3


@dataclass
class ImageProject:
    """A Label Studio project whose tasks hold generated wire images.

    Attributes:
        id: project id.
        images: task id -> the image it shows.
    """

    id: int
    images: dict[int, WireImage]


def create_project(client: LabelStudio, config_file: str, title: str) -> int:
    config = (LABELING_CONFIGS / config_file).read_text()
    return int(client.projects.create(title=title, label_config=config).id)


def upload_images(server: LabelStudioServer, project_id: int, images: Sequence[WireImage]
                  ) -> list[int]:
    """Upload PNGs as files (task URLs ``/data/upload/<project>/<file>``); return task ids.

    One file per request, so that the task ids come back in the order of ``images``.
    """
    task_ids = []
    for img in images:
        response = httpx.post(f"{server.url}/api/projects/{project_id}/import",
                              params={"return_task_ids": "true"}, headers=server.headers,
                              files={"file": (img.path.name, img.path.read_bytes(), "image/png")},
                              timeout=60)
        response.raise_for_status()
        task_ids += [int(task_id) for task_id in response.json()["task_ids"]]
    return task_ids


def import_local_files(client: LabelStudio, server: LabelStudioServer, project_id: int,
                       images: Sequence[WireImage]) -> list[int]:
    """Import tasks pointing at local files (``/data/local-files/?d=...``); return task ids.

    Label Studio serves a local file only to projects with a local storage holding its folder,
    so one is added (not synced: the tasks are imported here, in order).
    """
    for folder in sorted({img.path.parent for img in images}):
        client.import_storage.local.create(project=project_id, path=str(folder),
                                           use_blob_urls=True, title=f"e2e {folder.name}")
    tasks = [{"image": server.local_file_url(img.path)} for img in images]
    done = client.projects.import_tasks(project_id, request=tasks, return_task_ids=True)
    return [int(task_id) for task_id in done.task_ids or []]


def make_images(root: Path, prefix: str, seeds: Sequence[int]) -> list[WireImage]:
    return [make_wire_image(root / f"{prefix}_{seed:02d}_400x300.png", seed) for seed in seeds]


def rectangle(image: WireImage, label: str, region_id: str) -> dict[str, Any]:
    """A rectangle result as the editor sends it (cf. predict_interactive_request.json)."""
    return {"id": region_id, "from_name": "box", "to_name": "image", "type": "rectanglelabels",
            "origin": "manual", "original_width": image.width, "original_height": image.height,
            "image_rotation": 0, "value": {**image.box_pct, "rectanglelabels": [label]}}


def keypoint(image: WireImage, label: str, x: float, y: float, positive: bool,
             region_id: str) -> dict[str, Any]:
    """A smart keypoint as the editor sends it: the sign at the top level (Alt+click: False)."""
    return {"id": region_id, "from_name": "click", "to_name": "image", "type": "keypointlabels",
            "origin": "manual", "original_width": image.width, "original_height": image.height,
            "image_rotation": 0, "is_positive": positive,
            "value": {"x": 100 * x / image.width, "y": 100 * y / image.height, "width": 0.6,
                      "keypointlabels": [label]}}


def region_prompt(image: WireImage, region_id: str, text: str) -> dict[str, Any]:
    """A per-region TextArea result: same id as its rectangle, the rectangle's geometry."""
    return {"id": region_id, "from_name": "prompt", "to_name": "image", "type": "textarea",
            "origin": "manual", "original_width": image.width, "original_height": image.height,
            "image_rotation": 0, "value": {**image.box_pct, "text": [text]}}


def brush_items(result: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [item for item in result if item.get("type") == "brushlabels"]


def wire_coverage(alpha: np.ndarray, image: WireImage) -> float:
    """Share of the wire's pixels a decoded mask covers."""
    return np.count_nonzero((alpha > 0) & image.mask) / np.count_nonzero(image.mask)


def assert_mask_covers_wire(item: dict[str, Any], image: WireImage, label: str) -> np.ndarray:
    """Decode a brush result and check its size and label, that it covers at least
    MIN_WIRE_COVERAGE of the wire's pixels (an empty mask fails) and stays inside the box.
    Returns the mask's alpha channel."""
    assert item["from_name"] == "mask" and item["to_name"] == "image"
    assert (item["original_width"], item["original_height"]) == (image.width, image.height)
    value = item["value"]
    assert value["format"] == "rle"
    assert value["brushlabels"] == [label]
    rgba = decode_rle(value["rle"])
    assert rgba.size == image.width * image.height * 4, "RLE does not decode to the image size"
    alpha = np.reshape(rgba, (image.height, image.width, 4))[:, :, 3]
    mask = alpha > 0
    covered = wire_coverage(alpha, image)
    assert covered >= MIN_WIRE_COVERAGE, \
        f"the mask covers {covered:.0%} of the wire's pixels ({np.count_nonzero(mask)} px in all)"
    x0, y0, x1, y1 = image.box_xyxy
    inside = np.zeros_like(mask)
    inside[max(0, int(y0) - MASK_MARGIN_PX): int(np.ceil(y1)) + MASK_MARGIN_PX + 1,
           max(0, int(x0) - MASK_MARGIN_PX): int(np.ceil(x1)) + MASK_MARGIN_PX + 1] = True
    outside = np.count_nonzero(mask & ~inside)
    assert outside == 0, f"{outside} mask pixels lie outside the box {image.box_xyxy}"
    return alpha


# ---------------------------------------------------------------- Label Studio alone


def test_label_studio_runs_the_pinned_version_with_our_token(label_studio: LabelStudioServer
                                                            ) -> None:
    version = httpx.get(f"{label_studio.url}/api/version", headers=label_studio.headers,
                        timeout=10).json()
    assert version["release"] == "1.23.2"
    me = httpx.get(f"{label_studio.url}/api/current-user/whoami", headers=label_studio.headers,
                   timeout=10).json()
    assert me["email"] == label_studio.username


@pytest.mark.parametrize("config_file", sorted(p.name for p in LABELING_CONFIGS.glob("*.xml")))
def test_label_studio_accepts_labeling_config(ls_client: LabelStudio, config_file: str) -> None:
    project = ls_client.projects.create(title=f"config {config_file}",
                                        label_config=(LABELING_CONFIGS / config_file).read_text())
    try:
        controls = project.parsed_label_config
        assert controls["box"]["type"] == "RectangleLabels"
        mask = controls.get("mask") or controls["outline"]
        assert mask["type"] in ("BrushLabels", "PolygonLabels")
        assert sorted(controls["box"]["labels"]) == sorted(mask["labels"])
    finally:
        ls_client.projects.delete(project.id)


def test_uploaded_and_local_file_images_are_served_with_the_token(
        label_studio: LabelStudioServer, ls_client: LabelStudio) -> None:
    project_id = create_project(ls_client, "wires.xml", "import check")
    uploaded = make_images(label_studio.data_dir / "generated", "upload", [0, 1])
    local = make_images(label_studio.files_root / "e2e", "local", [2])
    task_ids = upload_images(label_studio, project_id, uploaded)
    task_ids += import_local_files(ls_client, label_studio, project_id, local)
    assert len(task_ids) == 3
    for task_id, image in zip(task_ids, uploaded + local):
        url = ls_client.tasks.get(str(task_id)).data["image"]
        assert url.startswith("/data/upload/" if image in uploaded else "/data/local-files/?d=")
        assert httpx.get(label_studio.url + url, timeout=10).status_code in (401, 403)
        served = httpx.get(label_studio.url + url, headers=label_studio.headers, timeout=10)
        assert served.status_code == 200
        assert Image.open(io.BytesIO(served.content)).size == (image.width, image.height)
    ls_client.projects.delete(project_id)


# ---------------------------------------------------------------- with the backend


@pytest.fixture(scope="module")
def wires_project(label_studio: LabelStudioServer, ls_client: LabelStudio, backend: Backend
                  ) -> Iterator[tuple[ImageProject, int]]:
    """A wires.xml project with 4 uploaded and 2 local-file images, the backend connected."""
    project_id = create_project(ls_client, "wires.xml", "e2e wires")
    uploaded = make_images(label_studio.data_dir / "generated", "wire", [10, 11, 12, 13])
    local = make_images(label_studio.files_root / "e2e", "wire", [14, 15])
    ids = upload_images(label_studio, project_id, uploaded)
    ids += import_local_files(ls_client, label_studio, project_id, local)
    ml = ls_client.ml.create(project=project_id, url=backend.url, is_interactive=True,
                             title="talk2sam e2e")
    yield ImageProject(id=project_id, images=dict(zip(ids, uploaded + local))), int(ml.id)
    ls_client.projects.delete(project_id)


def predict_interactive(client: LabelStudio, ml_id: int, task_id: int,
                        context: dict[str, Any]) -> dict[str, Any]:
    """What the editor gets back: Label Studio's ``{"data": results[0]}`` or its errors."""
    raw = client.ml.with_raw_response.predict_interactive(ml_id, task=task_id, context=context)
    answer = raw._response.json()
    assert "errors" not in answer, answer
    return answer["data"]


def test_backend_is_connected(ls_client: LabelStudio, wires_project: tuple[ImageProject, int]
                              ) -> None:
    _, ml_id = wires_project
    ml = ls_client.ml.get(ml_id)
    assert ml.state in ("CO", "CONNECTED"), ml.state
    assert ml.is_interactive


@pytest.mark.parametrize("label", ["Power line", "Cable"])
def test_interactive_prediction_fits_the_drawn_box(
        ls_client: LabelStudio, wires_project: tuple[ImageProject, int], label: str) -> None:
    project, ml_id = wires_project
    for task_id, image in list(project.images.items())[:2]:
        context = {"result": [rectangle(image, label, f"r{task_id}")]}
        data = predict_interactive(ls_client, ml_id, task_id, context)
        masks = brush_items(data["result"])
        assert len(masks) == 1, data
        assert_mask_covers_wire(masks[0], image, label)
        assert 0.0 <= float(data["score"]) <= 1.0
        assert data["model_version"]


def test_interactive_prediction_with_free_text_prompt(
        label_studio: LabelStudioServer, ls_client: LabelStudio, backend: Backend) -> None:
    project_id = create_project(ls_client, "thin_structures_prompt.xml", "e2e prompt")
    image = make_wire_image(label_studio.files_root / "e2e" / "prompt_20_400x300.png", 20)
    (task_id,) = import_local_files(ls_client, label_studio, project_id, [image])
    ml = ls_client.ml.create(project=project_id, url=backend.url, is_interactive=True)
    # The editor sends the selected box with its per-region prompt under the same id.
    context = {"result": [rectangle(image, "Wire", "w1"), region_prompt(image, "w1", "guy wire")]}
    data = predict_interactive(ls_client, int(ml.id), task_id, context)
    masks = brush_items(data["result"])
    assert len(masks) == 1, data
    assert_mask_covers_wire(masks[0], image, "Wire")
    ls_client.projects.delete(project_id)


LOWER_CASE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="wire"/><Label value="fence"/><Label value="bicycle"/>
  </RectangleLabels>
  <BrushLabels name="mask" toName="image">
    <Label value="wire"/><Label value="fence"/><Label value="bicycle"/>
  </BrushLabels>
</View>"""


def test_demo_model_segments_a_wire_under_lower_case_labels(
        label_studio: LabelStudioServer, ls_client: LabelStudio, backend: Backend) -> None:
    """A wire on a sky gradient with a fence below, in images of other sizes than the demo
    was trained on: every mask covers part of the wire and none of it lies outside the box, and
    on average the masks cover MEAN_WIRE_COVERAGE of the wire's pixels."""
    project_id = int(ls_client.projects.create(title="e2e lower case",
                                               label_config=LOWER_CASE_CONFIG).id)
    images = [make_wire_image(label_studio.files_root / "e2e" / f"sky_{seed}.png", seed, w, h)
              for seed, (w, h) in zip((40, 41, 42), ((640, 360), (380, 520), (500, 420)))]
    task_ids = import_local_files(ls_client, label_studio, project_id, images)
    ml = ls_client.ml.create(project=project_id, url=backend.url, is_interactive=True)
    covered = []
    for task_id, image in zip(task_ids, images):
        data = predict_interactive(ls_client, int(ml.id), task_id,
                                   {"result": [rectangle(image, "wire", f"k{task_id}")]})
        (item,) = brush_items(data["result"])
        covered.append(wire_coverage(assert_mask_covers_wire(item, image, "wire"), image))
    assert np.mean(covered) >= MEAN_WIRE_COVERAGE, covered
    ls_client.projects.delete(project_id)


def test_clicks_sent_without_their_box_refine_it_and_a_click_alone_is_labelled(
        label_studio: LabelStudioServer, ls_client: LabelStudio, backend: Backend) -> None:
    """The contexts the editor sends: a rectangle first, then keypoint-only contexts."""
    from scipy import ndimage

    project_id = create_project(ls_client, "wires.xml", "e2e clicks")
    images = make_images(label_studio.files_root / "e2e", "click", [50, 51])
    (boxed_task, alone_task) = import_local_files(ls_client, label_studio, project_id, images)
    ml_id = int(ls_client.ml.create(project=project_id, url=backend.url, is_interactive=True).id)
    image = images[0]
    predict_interactive(ls_client, ml_id, boxed_task,
                        {"result": [rectangle(image, "Power line", "r1")]})
    # a negative click in the box, away from the wire: the editor sends the keypoint alone
    x0, y0, x1, y1 = image.box_xyxy
    far = ndimage.distance_transform_edt(~image.mask)
    inside = np.zeros_like(image.mask)
    inside[int(y0) + 1:int(y1) - 1, int(x0) + 1:int(x1) - 1] = True
    cy, cx = np.unravel_index(np.argmax(np.where(inside, far, 0)), far.shape)
    data = predict_interactive(ls_client, ml_id, boxed_task, {"result": [
        keypoint(image, "Power line", float(cx), float(cy), False, "k1")]})
    (item,) = brush_items(data["result"])
    assert "meta" not in item  # paired with the box drawn before: its mask, cut to that box
    assert_mask_covers_wire(item, image, "Power line")
    # a click on the other task, which has no box of that label: a mask of the click alone
    ys, xs = np.nonzero(images[1].mask)
    data = predict_interactive(ls_client, ml_id, alone_task, {"result": [
        keypoint(images[1], "Power line", float(xs[len(xs) // 2]), float(ys[len(ys) // 2]),
                 True, "k2")]})
    (item,) = brush_items(data["result"])
    assert item["meta"]["text"][0].startswith("clicks only"), item.get("meta")
    assert item["value"]["brushlabels"] == ["Power line"]
    alone = np.reshape(decode_rle(item["value"]["rle"]), (images[1].height, images[1].width, 4))
    # 20 % with the shipped demo (46 % with the demo before it was trained with clicks next to
    # boxes, 2 % before it was also trained with clicks alone): an empty or misplaced mask fails
    covered = wire_coverage(alone[:, :, 3], images[1])
    assert covered >= 0.1, f"the clicks-only mask covers {covered:.0%} of the clicked wire"
    ls_client.projects.delete(project_id)


def test_retrieve_predictions_for_annotated_tasks(
        ls_client: LabelStudio, wires_project: tuple[ImageProject, int]) -> None:
    project, _ = wires_project
    annotated = list(project.images.items())[2:]
    labels = {}
    for n, (task_id, image) in enumerate(annotated):
        labels[task_id] = ("Wire", "Power line")[n % 2]
        ls_client.annotations.create(task_id, result=[rectangle(image, labels[task_id], f"a{n}")],
                                     project=project.id)
    ls_client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                             selected_items={"all": False, "included": list(labels)})
    for task_id, image in annotated:
        predictions = ls_client.predictions.list(task=task_id)
        assert len(predictions) == 1, f"task {task_id}: {len(predictions)} predictions"
        masks = brush_items(predictions[0].result)
        assert len(masks) == 1, predictions[0].result
        assert_mask_covers_wire(masks[0], image, labels[task_id])


def test_a_phone_photo_stored_sideways_gets_masks_where_the_annotator_sees_the_wire(
        label_studio: LabelStudioServer, ls_client: LabelStudio, backend: Backend,
        tmp_path: Path) -> None:
    """A JPEG stored 300x400 with EXIF Orientation 6, shown by browsers (and Label Studio's
    editor) as 400x300: the box is drawn on the shown image, and the mask must cover the wire
    there, at the shown size."""
    shown = make_wire_image(tmp_path / "shown.png", 44)  # the picture as the annotator sees it
    stored = Image.open(shown.path).transpose(Image.Transpose.ROTATE_90)  # 90 degrees left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    jpeg = tmp_path / "phone_photo.jpg"
    stored.save(jpeg, format="JPEG", quality=95, exif=exif.tobytes())
    project_id = int(ls_client.projects.create(title="e2e exif",
                                               label_config=LOWER_CASE_CONFIG).id)
    response = httpx.post(f"{label_studio.url}/api/projects/{project_id}/import",
                          params={"return_task_ids": "true"}, headers=label_studio.headers,
                          files={"file": (jpeg.name, jpeg.read_bytes(), "image/jpeg")},
                          timeout=60)
    response.raise_for_status()
    (task_id,) = response.json()["task_ids"]
    ml = ls_client.ml.create(project=project_id, url=backend.url, is_interactive=True)
    data = predict_interactive(ls_client, int(ml.id), int(task_id),
                               {"result": [rectangle(shown, "wire", "exif")]})
    (item,) = brush_items(data["result"])
    assert_mask_covers_wire(item, shown, "wire")  # size 400x300, the wire covered, in the box
    ls_client.projects.delete(project_id)
