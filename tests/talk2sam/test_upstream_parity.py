"""Box-only Talk2SAM is SAM-HQ: on the same weights, written by segment_anything_hq's own builder
in the official layout (the bare state dict the released .pth holds) and loaded through
talk2sam's entry point, its answer equals SAM-HQ's own SamPredictor in float32. Real-size
architectures with random weights (a vit_b encoder takes tens of seconds on a CPU)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from talk2sam.build import build_model
from talk2sam.predictor import Talk2SamPredictor


def wire_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    image[100:110, :] = 20  # a dark band, so the box holds something
    return image


@pytest.mark.parametrize("variant", ["vit_tiny", "vit_b"])
def test_box_only_equals_samhq_predictor_on_the_same_weights(variant, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from segment_anything_hq import SamPredictor, sam_model_registry

    torch.manual_seed(0)
    upstream = sam_model_registry[variant](checkpoint=None).eval()
    torch.save(upstream.state_dict(), tmp_path / f"sam_hq_{variant}.pth")
    ours = Talk2SamPredictor(build_model(variant, weights_dir=tmp_path, use_text=False),
                             encoder_dtype=torch.float32)
    image, box = wire_image(), np.array([50.0, 80.0, 350.0, 130.0])

    reference = SamPredictor(upstream)
    reference.set_image(image)
    masks, _, low_res = reference.predict(box=box, multimask_output=False, return_logits=True)
    ours.set_image(image)
    answer = ours.predict(box[None], None, return_logits=True)

    logits = np.asarray(answer.logits).reshape(low_res.shape)
    assert np.abs(logits - low_res).max() < 1e-4  # 1.9e-6 measured (vit_b, vit_tiny)
    assert (answer.masks[0] == (masks[0] > 0)).mean() >= 0.9999
    assert answer.masks[0].any()


def test_the_cli_answers_with_samhq_predictors_mask(tmp_path):
    """The same check through `talk2sam segment --box-only --encoder-dtype float32` (vit_tiny,
    the official file named by MODEL_WEIGHT_FILES from another folder)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from segment_anything_hq import SamPredictor, sam_model_registry

    torch.manual_seed(1)
    upstream = sam_model_registry["vit_tiny"](checkpoint=None).eval()
    weights_file = tmp_path / "mine" / "light_hq_sam.pth"
    weights_file.parent.mkdir()
    torch.save(upstream.state_dict(), weights_file)
    image, box = wire_image(), [50.0, 80.0, 350.0, 130.0]
    Image.fromarray(image).save(tmp_path / "wire.png")
    env = {**os.environ, "MODEL_WEIGHT_FILES": f"sam_hq_vit_tiny.pth={weights_file}",
           "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "talk2sam.cli", "segment", str(tmp_path / "wire.png"),
         "--config", "vit_tiny", "--box-only", "--encoder-dtype", "float32", "--weights-dir",
         str(tmp_path / "empty"), "--box", *map(str, box), "--device", "cpu"],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = np.asarray(Image.open(tmp_path / "wire_mask.png")) > 0
    reference = SamPredictor(upstream)
    reference.set_image(image)
    masks, _, _ = reference.predict(box=np.array(box), multimask_output=False)
    assert ours.any() and (ours == masks[0]).mean() >= 0.999
