"""A real Label Studio 1.23.2 and the backend serving the shipped demo: clicks that refine a
box's mask, polygons Label Studio stores and shows, and text alone (no box), with the contexts
the editor sends and pictures drawn by other code than the demo's training data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle
from scipy import ndimage

from ml_backend.ls_format import polygon_mask
from tests.e2e.harness import Backend, LabelStudioServer
from tests.e2e.synthetic_images import (
    ClickScene,
    make_click_scene,
    make_wire_image,
    make_wires_image,
)
from tests.e2e.test_label_studio_e2e import (
    MIN_WIRE_COVERAGE,
    brush_items,
    create_project,
    import_local_files,
    keypoint,
    predict_interactive,
    rectangle,
    wire_coverage,
)

pytestmark = pytest.mark.e2e


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / max(1, np.count_nonzero(a | b))


def brush_of(item: dict[str, Any], height: int, width: int) -> np.ndarray:
    return np.reshape(decode_rle(item["value"]["rle"]), (height, width, 4))[:, :, 3] > 0


def deepest(region: np.ndarray) -> tuple[float, float]:
    """The pixel of ``region`` farthest from its border, as x, y: where an annotator clicks."""
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(x), float(y)


def test_clicks_sent_after_their_box_steer_its_mask_away_from_a_distractor_and_onto_the_wire(
        label_studio: LabelStudioServer, ls_client: LabelStudio, backend: Backend) -> None:
    """The editor's contexts: a rectangle, then the label's keypoints alone. The box around a
    wire holds a pole the box + word mask takes too; an Alt+click (negative) on the pole must
    take some of it out, and a click (positive) on what the mask then misses of the wire must
    add some of it. The shipped demo learned clicks only weakly (docs/LEARNING_CHECK.md): the
    directions are checked here, not that one click removes the whole pole."""
    project_id = create_project(ls_client, "wires.xml", "e2e click refine")
    scenes = [make_click_scene(label_studio.files_root / "e2e" / f"refine_{s}.png", s)
              for s in (0, 1, 2)]
    tasks = import_local_files(ls_client, label_studio, project_id, scenes)  # type: ignore[arg-type]
    ml_id = int(ls_client.ml.create(project=project_id, url=backend.url, is_interactive=True).id)
    for task_id, scene in zip(tasks, scenes):
        shape = (scene.height, scene.width)
        first = predict_interactive(ls_client, ml_id, task_id,
                                    {"result": [rectangle(scene, "Power line", "r1")]})
        (item,) = brush_items(first["result"])
        boxed = brush_of(item, *shape)
        pole = scene.distractor & _inside(scene)
        assert np.count_nonzero(boxed & pole) >= 0.3 * np.count_nonzero(pole), \
            "the box + word mask should take the pole too: nothing for a click to remove"
        negative = keypoint(scene, "Power line", *deepest(pole), False, "k1")
        second = predict_interactive(ls_client, ml_id, task_id, {"result": [negative]})
        (item,) = brush_items(second["result"])
        assert "meta" not in item  # paired with the rectangle answered before, not clicks alone
        refined = brush_of(item, *shape)
        assert np.count_nonzero(refined & pole) < np.count_nonzero(boxed & pole), \
            "the negative click on the pole took none of it out"
        assert np.count_nonzero(refined & scene.target) >= \
            0.5 * np.count_nonzero(boxed & scene.target), "the negative click lost the wire"
        missed = scene.target & ~refined
        positive = keypoint(scene, "Power line", *deepest(_largest(missed)), True, "k2")
        third = predict_interactive(ls_client, ml_id, task_id, {"result": [negative, positive]})
        (item,) = brush_items(third["result"])
        fixed = brush_of(item, *shape)
        assert np.count_nonzero(fixed & scene.target) > np.count_nonzero(refined & scene.target), \
            "the positive click on the missed wire added none of it"
    ls_client.projects.delete(project_id)


def _inside(scene: ClickScene) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in scene.box_xyxy)
    inside = np.zeros((scene.height, scene.width), bool)
    inside[max(0, y0):y1, max(0, x0):x1] = True
    return inside


def _largest(region: np.ndarray) -> np.ndarray:
    parts, count = ndimage.label(region)
    assert count, "the mask misses nothing of the wire: no place for a positive click"
    return parts == int(np.argmax(np.bincount(parts.ravel())[1:])) + 1


def test_a_polygon_config_gets_polygons_label_studio_stores(
        label_studio: LabelStudioServer, ls_client: LabelStudio, backend: Backend) -> None:
    project_id = create_project(ls_client, "wires_polygons.xml", "e2e polygons")
    images = [make_wire_image(label_studio.files_root / "e2e" / f"poly_{s}_400x300.png", s)
              for s in (30, 31)]
    interactive_task, batch_task = import_local_files(ls_client, label_studio, project_id, images)
    ml_id = int(ls_client.ml.create(project=project_id, url=backend.url, is_interactive=True).id)
    data = predict_interactive(ls_client, ml_id, interactive_task,
                               {"result": [rectangle(images[0], "Wire", "r1")]})
    polygons = [i for i in data["result"] if i["type"] == "polygonlabels"]
    assert polygons and len(polygons) == len(data["result"]), data["result"]
    assert all(i["from_name"] == "outline" and i["value"]["polygonlabels"] == ["Wire"]
               for i in polygons)
    union = np.any([polygon_mask(i) for i in polygons], axis=0)
    assert wire_coverage(union, images[0]) >= MIN_WIRE_COVERAGE
    # the same box in a brush project: the polygons outline the same mask
    brush_project = create_project(ls_client, "wires.xml", "e2e polygons vs brush")
    (brush_task,) = import_local_files(ls_client, label_studio, brush_project, images[:1])
    brush_ml = int(ls_client.ml.create(project=brush_project, url=backend.url,
                                       is_interactive=True).id)
    (brush,) = brush_items(predict_interactive(ls_client, brush_ml, brush_task, {
        "result": [rectangle(images[0], "Wire", "r1")]})["result"])
    agreement = iou(union, brush_of(brush, images[0].height, images[0].width))
    assert agreement >= 0.85, f"polygons against the brush mask: IoU {agreement:.3f}"
    ls_client.projects.delete(brush_project)
    # stored as the annotator's own regions: Label Studio validates them against the config
    annotation = ls_client.annotations.create(interactive_task, result=polygons,
                                              project=project_id)
    stored = ls_client.annotations.get(annotation.id).result
    assert [i["type"] for i in stored] == ["polygonlabels"] * len(polygons)
    # and as predictions, by Retrieve predictions on a task with a box
    ls_client.annotations.create(batch_task, result=[rectangle(images[1], "Power line", "b")],
                                 project=project_id)
    ls_client.actions.create(id="retrieve_tasks_predictions", project=project_id,
                             selected_items={"all": False, "included": [batch_task]})
    (prediction,) = ls_client.predictions.list(task=batch_task)
    assert {i["type"] for i in prediction.result} == {"polygonlabels"}
    union = np.any([polygon_mask(i) for i in prediction.result], axis=0)
    assert wire_coverage(union, images[1]) >= MIN_WIRE_COVERAGE
    ls_client.projects.delete(project_id)


def test_a_word_alone_finds_each_of_three_wires(
        label_studio: LabelStudioServer, ls_client: LabelStudio, backend: Backend) -> None:
    """No box: a "Find every" choice in the context, and the same choice saved in an annotation
    for Retrieve predictions; each of the three wires comes back as a region of its own."""
    project_id = create_project(ls_client, "thin_structures_find.xml", "e2e text alone")
    images = [make_wires_image(label_studio.files_root / "e2e" / f"three_{s}.png", s,
                               ground=False) for s in (1, 3)]
    tasks = import_local_files(ls_client, label_studio, project_id, images)  # type: ignore[arg-type]
    ml_id = int(ls_client.ml.create(project=project_id, url=backend.url, is_interactive=True).id)
    choice = {"id": "f1", "from_name": "find", "to_name": "image", "type": "choices",
              "origin": "manual", "value": {"choices": ["Wire"]}}
    data = predict_interactive(ls_client, ml_id, tasks[0], {"result": [choice]})
    _assert_one_region_per_wire(data["result"], images[0])
    ls_client.annotations.create(tasks[1], result=[choice], project=project_id)
    ls_client.actions.create(id="retrieve_tasks_predictions", project=project_id,
                             selected_items={"all": False, "included": [tasks[1]]})
    (prediction,) = ls_client.predictions.list(task=tasks[1])
    _assert_one_region_per_wire(prediction.result, images[1])
    ls_client.projects.delete(project_id)


def _assert_one_region_per_wire(result: list[dict[str, Any]], image: Any) -> None:
    regions = brush_items(result)
    assert len(regions) == 3 == len(result), [i.get("meta") for i in result]
    assert all(i["value"]["brushlabels"] == ["Wire"] and 0.0 < i["score"] <= 1.0
               for i in regions)
    assert all(i["meta"]["text"][0].startswith("found by the text 'Wire' alone")
               for i in regions)
    cover = np.array([[np.count_nonzero(brush_of(i, image.height, image.width) & w)
                       / np.count_nonzero(w) for w in image.masks] for i in regions])
    assert sorted(cover.argmax(axis=1).tolist()) == [0, 1, 2], cover
    assert cover.max(axis=1).min() >= 0.3, cover
