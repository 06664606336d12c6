"""The benchmark's model tables and its command line run on tiny configs (no timing assertions:
shared machines are noisy); the service tables are tested in tests/ml_backend/test_bench_service.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from talk2sam import bench

REPO = Path(__file__).resolve().parents[1]


def load_script():
    """scripts/benchmark.py as a module (scripts/ is no package)."""
    name = "talk2sam_benchmark_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "benchmark.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def pair() -> bench.Pair:
    return bench.build_pair("tiny", "cpu")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return bench.synthetic_images(2, height=60, width=80)


def test_pair_shares_one_sam_module(pair):
    assert pair.samhq.model.sam is pair.talk2sam.model.sam
    assert not pair.samhq.model.uses_text and pair.talk2sam.model.uses_text
    assert "DINOv2" in pair.describe()


def test_boxes_stay_inside_the_image(images):
    boxes = bench.boxes_for(images[0], 16)
    assert boxes.shape == (16, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 60).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_model_tables(pair, images):
    bench.warm_up(pair, images[0])
    cold = bench.cold_table(pair, images, repeats=1)
    assert {"cold_samhq_ms", "cold_talk2sam_ms", "cold_ratio"} <= cold.values.keys()
    assert len(cold.rows) == 4
    warm = bench.warm_table(pair, images, prompts=1, cold=cold)
    assert {"warm_box_ms", "warm_word_ms", "warm_box_share"} <= warm.values.keys()
    batch = bench.batch_table(pair, images[0], counts=(1, 2), repeats=1)
    assert [row[0] for row in batch.rows] == ["1", "2"]
    assert batch.values["batch_2_ms_per_box"] > 0
    overlap = bench.overlap_table(pair, images[:1])
    assert overlap.values["sequential_ms"] > 0 and overlap.values["overlapped_ms"] > 0
    for table in (cold, warm, batch, overlap):
        lines = table.markdown().splitlines()
        assert lines[0].startswith("### ")
        assert all(line.count("|") == len(table.columns) + 1 for line in lines[2:4 + len(table.rows)])


def test_head_table_switches_and_gives_the_base_back(pair, images):
    pair.talk2sam.set_image(images[0])
    before = pair.talk2sam.predict(bench.boxes_for(images[0], 1), "wire", return_logits=True)
    table = bench.head_table(pair, images[0], prompts=2)
    assert {"head_switch_ms", "same_box_ms", "switched_box_ms", "head_mib",
            "heads_fit"} <= table.values.keys()
    assert table.values["heads_fit"] > 1000  # a tiny head is 0.2 MiB
    pair.talk2sam.set_image(images[0])
    after = pair.talk2sam.predict(bench.boxes_for(images[0], 1), "wire", return_logits=True)
    assert np.array_equal(before.logits, after.logits)  # the base's head is back in place


def test_percentile_is_nearest_rank():
    samples = [i / 1000 for i in range(1, 101)]
    assert bench.percentile_ms(samples, 99) == pytest.approx(99.0)
    assert bench.percentile_ms(samples, 100) == pytest.approx(100.0)
    assert bench.median_ms([0.001, 0.003, 0.002]) == pytest.approx(2.0)


def test_quick_defaults_and_help(capsys):
    script = load_script()
    args = script.parse_args(["--quick"])
    assert (args.what, args.configs, args.images, args.calls) == ("all", ["tiny"], 2, 20)
    assert script.parse_args(["cpu"]).configs == ["tiny-768", "vit_tiny-dinob", "vit_b-dinob"]
    gpu = script.parse_args(["gpu"])
    assert (gpu.configs, gpu.device) == (["vit_b", "vit_l", "vit_h"], "cuda")
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    assert "--configs" in capsys.readouterr().out


def test_gpu_tables_run_on_the_cpu_with_the_tiny_config():
    # the prepared GPU script's code path, minus CUDA: every column filled, agreement in [0, 1]
    script = load_script()
    args = script.parse_args(["gpu", "--device", "cpu", "--configs", "tiny", "--images", "1",
                              "--prompts", "1"])
    summary, *details = list(script.gpu_tables(args))
    (row,) = summary.rows
    assert row[0] == "`tiny`" and row[-1] == "n/a (CPU)" and all(row)
    precision = next(t for t in details if "bfloat16" in t.title)
    assert 0.0 <= precision.values["bf16_iou_median"] <= 1.0
    assert [r[0] for r in precision.rows] == ["float32", "bfloat16"]


def test_tuning_table_has_one_row_per_step(images):
    import torch

    from talk2sam.predictor import default_encoder_dtype

    table = bench.tuning_table("tiny", images[:1], prompts=1, device="cpu")
    bf16 = default_encoder_dtype(torch.device("cpu")) is torch.bfloat16
    assert len(table.rows) == (4 if bf16 else 3)
    assert table.rows[0][4:] == ["1.00", "1.00"]  # ratios against the path before tuning
