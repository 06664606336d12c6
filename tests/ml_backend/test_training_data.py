"""The split of a project's tasks into training and held-out sets, and which tasks count."""

from __future__ import annotations

from ml_backend.training_data import has_masks, split_tasks


def test_split_is_stable_per_task_and_never_empty():
    tasks = [{"id": i} for i in range(1, 200)]
    train, held = split_tasks(tasks, 20)
    assert 20 < len(held) < 60 and len(train) + len(held) == len(tasks)
    _, more_held = split_tasks(tasks + [{"id": i} for i in range(200, 400)], 20)
    assert {t["id"] for t in held} <= {t["id"] for t in more_held}  # no task changes sides
    for pair in ([{"id": 1}, {"id": 2}], [{"id": 5}, {"id": 9}, {"id": 11}]):
        train, held = split_tasks(pair, 20)
        assert train and held


def test_a_small_project_holds_out_the_minimum_number_of_tasks_at_most_half():
    tasks = [{"id": i} for i in range(1, 11)]
    train, held = split_tasks(tasks, 1, min_held=3)
    assert (len(train), len(held)) == (7, 3)
    train, held = split_tasks(tasks[:4], 1, min_held=3)
    assert (len(train), len(held)) == (2, 2)


def test_only_tasks_with_masks_are_split_and_cancelled_annotations_hold_none():
    brush = {"type": "brushlabels"}
    assert has_masks({"annotations": [{"result": [{"type": "rectanglelabels"}, brush]}]})
    assert not has_masks({"annotations": [{"result": [{"type": "rectanglelabels"}]}]})
    assert not has_masks({"annotations": [{"result": [brush], "was_cancelled": True}]})
    assert not has_masks({"annotations": None}) and not has_masks({})


def test_a_polygon_correction_counts_as_a_mask():
    polygon = {"type": "polygonlabels"}
    assert has_masks({"annotations": [{"result": [{"type": "rectanglelabels"}, polygon]}]})
    assert not has_masks({"annotations": [{"result": [polygon], "was_cancelled": True}]})
