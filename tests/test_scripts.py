"""scripts/: every script answers --help; evaluate.py runs on a tiny generated folder dataset; the
pure parts of the Label Studio scripts (active-learning ranking, task URLs, export summary)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
NEW_SCRIPTS = ("evaluate", "export_annotations", "import_tasks", "select_next_batch",
               "download_weights", "memory_benchmark")


@pytest.fixture
def script(monkeypatch):
    """Import a script as a module (scripts/ on sys.path, as when it runs)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module


@pytest.mark.parametrize("name", NEW_SCRIPTS)
def test_help(name):
    out = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), "--help"], check=False,
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:")


def test_evaluate_on_a_tiny_folder_dataset(tmp_path, script, capsys):
    from talk2sam.data.datasets import write_folder_dataset
    from talk2sam.data.synthetic import SyntheticThinDataset

    data = write_folder_dataset(SyntheticThinDataset(4), tmp_path / "tiny")
    out = tmp_path / "eval.json"
    figure = tmp_path / "grid.png"
    assert script("evaluate").main([str(data), "--out", str(out), "--threads", "1",
                                    "--figure", str(figure), "--figure-rows", "2"]) == 0
    assert Image.open(figure).size[0] > 600  # 6 columns: image, map, truth, 3 methods
    summary = json.loads(out.read_text())
    assert summary["objects"] == 4
    assert list(summary["results"]) == ["SAM tiny", "SAM-HQ tiny", "Talk2SAM tiny"]
    for scores in summary["results"].values():
        assert scores["count"] == 4 and 0.0 <= scores["miou"] <= 1.0
        assert 0.0 <= scores["mbiou"] <= 1.0 and scores["s_per_image"] > 0
    # an untrained residual text branch is exactly box-only SAM-HQ
    assert summary["results"]["Talk2SAM tiny"]["miou"] == summary["results"]["SAM-HQ tiny"]["miou"]
    printed = capsys.readouterr().out
    assert "| method | backbone | version | mIoU | mBIoU | time per image |" in printed
    assert "| SAM-HQ | tiny | samhq-tiny-random |" in printed and summary["table"] in printed


def test_evaluate_reports_a_missing_dataset(tmp_path, script):
    assert script("evaluate").main([str(tmp_path / "nothing"), "--out",
                                    str(tmp_path / "e.json")]) == 2


# ---------------------------------------------------------------- active learning ranking


def task(task_id, *predictions, annotations=()):
    return {"id": task_id, "data": {"image": f"/data/upload/1/{task_id}.png"},
            "predictions": list(predictions), "annotations": list(annotations)}


def pred(score, version="v2", created="2026-01-02T00:00:00Z", regions=None, pred_id=1):
    return {"id": pred_id, "score": score, "model_version": version, "created_at": created,
            "result": regions or []}


def test_lowest_score_first_and_only_n(script):
    rank = script("select_next_batch").rank_uncertain
    tasks = [task(1, pred(0.9)), task(2, pred(0.2)), task(3, pred(0.55)), task(4, pred(0.1))]
    assert [(t["id"], s) for t, s in rank(tasks, 3)] == [(4, 0.1), (2, 0.2), (3, 0.55)]


def test_tasks_without_prediction_or_annotated_are_left_out(script):
    rank = script("select_next_batch").rank_uncertain
    done = [{"id": 9, "result": [], "was_cancelled": False}]
    skipped = [{"id": 8, "result": [], "was_cancelled": True}]
    tasks = [task(1), task(2, pred(0.1), annotations=done), task(3, pred(0.3), annotations=skipped),
             task(4, pred(0.4))]
    assert [t["id"] for t, _ in rank(tasks, 10)] == [3, 4]
    assert [t["id"] for t, _ in rank(tasks, 10, include_annotated=True)] == [2, 3, 4]


def test_most_recent_prediction_counts_and_model_version_filters(script):
    mod = script("select_next_batch")
    old = pred(0.05, "v1", "2026-01-01T00:00:00Z", pred_id=1)
    new = pred(0.8, "v2", "2026-01-03T00:00:00Z", pred_id=2)
    assert mod.task_score(task(1, old, new)) == 0.8
    assert mod.task_score(task(1, old, new), model_version="v1") == 0.05
    assert mod.task_score(task(1, old), model_version="v3") is None


def test_region_scores_stand_in_for_a_missing_task_score(script):
    mod = script("select_next_batch")
    regions = [{"type": "brushlabels", "score": 0.2}, {"type": "brushlabels", "score": 0.4}]
    assert mod.task_score(task(1, pred(None, regions=regions))) == pytest.approx(0.3)
    assert mod.task_score(task(1, pred(None))) is None


def test_ties_break_by_task_id(script):
    rank = script("select_next_batch").rank_uncertain
    tasks = [task(7, pred(0.5)), task(3, pred(0.5)), task(5, pred(0.5))]
    assert [t["id"] for t, _ in rank(tasks, 3)] == [3, 5, 7]


def test_data_manager_hint_names_the_sort_and_ids(script):
    hint = script("select_next_batch").data_manager_hint("http://ls:8080/", 3, [4, 2])
    assert "http://ls:8080/projects/3/data" in hint and "Prediction score" in hint
    assert "4, 2" in hint


# ---------------------------------------------------------------- import and export helpers


def test_local_file_and_prefixed_task_urls(tmp_path, script):
    mod = script("import_tasks")
    folder = tmp_path / "root" / "wires"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "sub/c.png", "notes.txt", ".hidden.png"):
        (folder / name).write_bytes(b"")
    assert [p.name for p in mod.list_images(folder, recursive=False)] == ["a.JPG", "b.png"]
    images = mod.list_images(folder, recursive=True)
    assert [p.relative_to(folder).as_posix() for p in images] == ["a.JPG", "b.png", "sub/c.png"]
    assert mod.local_file_urls(images, tmp_path / "root")[2] == \
        "/data/local-files/?d=wires/sub/c.png"
    assert mod.prefixed_urls(images, folder, "http://files:8000/")[0] == \
        "http://files:8000/a.JPG"
    with pytest.raises(SystemExit, match="not under the local-files root"):
        mod.local_file_urls(images, tmp_path / "elsewhere")


def test_export_summary(script):
    tasks = [{"annotations": [{"result": [{}, {}], "was_cancelled": False},
                              {"result": [], "was_cancelled": True}]}, {"annotations": []}]
    assert script("export_annotations").summarize(tasks) == \
        "2 tasks, 2 annotations (1 cancelled), 2 regions"


def test_click_check_measures_the_demo_on_both_held_out_sets(script, capsys):
    """--measure-only: box + word, +1 and +3 click mIoU on the single set and the pole scenes."""
    assert script("click_check").main(["--measure-only", "--heldout", "2", "--scenes", "2",
                                       "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| single") or line.startswith("| wire")]
    assert len(rows) == 2
    for row in rows:
        values = [float(v) for v in row.strip("| ").split(" | ")[1:]]
        assert len(values) == 3 and all(0.0 < v <= 1.0 for v in values), row
