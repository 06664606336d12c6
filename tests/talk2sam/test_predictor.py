import numpy as np
import pytest
import torch

from talk2sam.build import build_model
from talk2sam.configs import get_config
from talk2sam.errors import ImageNotSetError, InvalidPromptError, UnusableImageError
from talk2sam.predictor import Talk2SamPredictor, default_encoder_dtype, normalize_image


def test_predictions_at_original_resolution_for_several_boxes(tiny_predictor, rgb_300x400):
    tiny_predictor.set_image(rgb_300x400)
    pred = tiny_predictor.predict([[100, 49, 280, 85], [10, 10, 120, 200], [0, 0, 400, 300]],
                                  ["wire", "fence", "bicycle"], return_logits=True)
    assert pred.masks.shape == (3, 300, 400) and pred.masks.dtype == np.bool_
    assert pred.logits.shape == (3, 64, 64) and pred.logits.dtype == np.float32
    assert pred.scores.shape == (3,) and pred.scores.dtype == np.float32
    assert np.all((pred.scores >= 0) & (pred.scores <= 1))
    assert pred.text_scores.shape == (3,)
    assert pred.sim_maps.shape == (3, 16, 16)


def test_batched_boxes_equal_one_by_one(tiny_predictor, rgb_300x400):
    tiny_predictor.set_image(rgb_300x400)
    boxes, words = [[100, 49, 280, 85], [10, 10, 120, 200]], ["wire", "fence"]
    together = tiny_predictor.predict(boxes, words, return_logits=True)
    for i in range(2):
        alone = tiny_predictor.predict([boxes[i]], [words[i]], return_logits=True)
        np.testing.assert_allclose(alone.logits[0], together.logits[i], atol=1e-4)


def test_text_changes_the_map_and_the_logits(rgb_300x400):
    # the paper's wiring: even untrained, the map reaches the decoder (residual mode starts as a
    # no-op instead: tests/talk2sam/test_dense_mode.py)
    predictor = Talk2SamPredictor(build_model(get_config("tiny", dense_mode="replace")))
    predictor.set_image(rgb_300x400)
    box = [[100, 49, 280, 85]]
    wire = predictor.predict(box, "wire", return_logits=True)
    fence = predictor.predict(box, "fence", return_logits=True)
    assert not np.allclose(wire.sim_maps, fence.sim_maps)
    assert not np.allclose(wire.logits, fence.logits)
    again = predictor.predict(box, "wire", return_logits=True)  # cached text embedding, same answer
    np.testing.assert_array_equal(again.logits, wire.logits)


def test_logits_are_copied_off_the_device_only_when_asked(tiny_predictor, rgb_300x400):
    tiny_predictor.set_image(rgb_300x400)
    assert tiny_predictor.predict([[100, 49, 280, 85]], "wire").logits is None


def test_the_hq_features_follow_the_image(rgb_300x400):
    # the predictor keeps the HQ decoder's per-image features for the current image only: after
    # another image, its masks are those of a fresh predictor on that image
    model = build_model(get_config("tiny", dense_mode="replace"))
    other = np.ascontiguousarray(rgb_300x400[::-1, ::-1])
    box = [[100, 49, 280, 85]]
    seen = Talk2SamPredictor(model)
    seen.set_image(rgb_300x400)
    first = seen.predict(box, "wire", return_logits=True).logits
    seen.set_image(other)
    after = seen.predict(box, "wire", return_logits=True).logits
    fresh = Talk2SamPredictor(model)
    fresh.set_image(other)
    np.testing.assert_array_equal(after, fresh.predict(box, "wire", return_logits=True).logits)
    assert not np.allclose(first, after)


def test_channels_last_gives_the_same_masks(rgb_300x400):
    model = build_model(get_config("tiny", dense_mode="replace"))
    box = [[100, 49, 280, 85], [10, 10, 120, 200]]
    plain = Talk2SamPredictor(model, channels_last=False)
    plain.set_image(rgb_300x400)
    reference = plain.predict(box, "wire", return_logits=True)
    nhwc = Talk2SamPredictor(model, channels_last=True)
    assert model.channels_last
    assert model.sam.image_encoder.patch_embed.proj.weight.is_contiguous(
        memory_format=torch.channels_last)
    nhwc.set_image(rgb_300x400)
    pred = nhwc.predict(box, "wire", return_logits=True)
    np.testing.assert_allclose(pred.logits, reference.logits, atol=1e-3)
    assert (pred.masks == reference.masks).mean() > 0.999


def test_box_only_mode_runs_through_the_same_predictor(rgb_300x400):
    predictor = Talk2SamPredictor(build_model("tiny", use_text=False))
    predictor.set_image(rgb_300x400)
    pred = predictor.predict([[100, 49, 280, 85]])
    assert pred.masks.shape == (1, 300, 400)
    assert pred.sim_maps is None and pred.text_scores is None
    assert predictor.model_version.startswith("samhq-tiny")


def test_predict_before_set_image(tiny_predictor):
    tiny_predictor.reset_image()
    with pytest.raises(ImageNotSetError):
        tiny_predictor.predict([[0, 0, 10, 10]], "wire")


@pytest.mark.parametrize("box, word, message", [
    ([500, 10, 600, 50], "wire", "outside"),
    ([10, 10, 10, 50], "wire", "zero or negative"),
    ([10, 10, 50, 50], "", "empty"),
    ([10, 10, 50, 50], "   ", "empty"),
    ([10, 10, 50, 50], "x" * 500, "characters"),
])
def test_bad_prompts_get_clear_errors(tiny_predictor, rgb_300x400, box, word, message):
    tiny_predictor.set_image(rgb_300x400)
    with pytest.raises(InvalidPromptError, match=message):
        tiny_predictor.predict([box], [word])


def test_word_count_must_match_boxes(tiny_predictor, rgb_300x400):
    tiny_predictor.set_image(rgb_300x400)
    with pytest.raises(InvalidPromptError, match="2 boxes but 1 words"):
        tiny_predictor.predict([[0, 0, 10, 10], [5, 5, 20, 20]], ["wire"])


def test_image_normalisation_is_deliberate():
    gray = np.full((20, 30), 100, np.uint8)
    assert normalize_image(gray).shape == (20, 30, 3)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 3] = 7
    assert normalize_image(rgba).shape == (20, 30, 3) and normalize_image(rgba).max() == 0
    deep = np.full((20, 30, 3), 65535, np.uint16)
    assert normalize_image(deep).dtype == np.uint8 and normalize_image(deep).max() == 255
    with pytest.raises(UnusableImageError, match="shape"):
        normalize_image(np.zeros((20, 30, 2), np.uint8))
    with pytest.raises(UnusableImageError, match="dtype"):
        normalize_image(np.zeros((20, 30, 3), np.int64))
    with pytest.raises(UnusableImageError, match="limit"):
        normalize_image(np.zeros((200, 300, 3), np.uint8), max_pixels=1000)


def test_grayscale_and_16_bit_images_segment(tiny_predictor):
    tiny_predictor.set_image(np.random.default_rng(0).integers(0, 65535, (90, 70), np.uint16))
    assert tiny_predictor.predict([[5, 5, 60, 80]], "wire").masks.shape == (1, 90, 70)


def test_masks_can_be_kept_inside_their_boxes(tiny_predictor, rgb_300x400):
    tiny_predictor.set_image(rgb_300x400)
    whole = tiny_predictor.predict([[100, 49, 280, 85]], "wire").masks[0]
    cut = tiny_predictor.predict([[100, 49, 280, 85]], "wire", box_margin_px=2).masks[0]
    ys, xs = np.nonzero(cut)
    assert len(xs) > 0 and whole.sum() > cut.sum()  # the random model spills; the cut keeps
    assert xs.min() >= 98 and xs.max() <= 282 and ys.min() >= 47 and ys.max() <= 87
    assert not (cut & ~whole).any()  # only ever removes pixels


def test_encoders_default_to_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    assert default_encoder_dtype(torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert default_encoder_dtype(torch.device("cpu")) is torch.float32
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert default_encoder_dtype(torch.device("cpu")) is torch.bfloat16


def test_clicks_reach_the_decoder_and_a_prompt_may_be_clicks_alone(rgb_300x400):
    predictor = Talk2SamPredictor(build_model(get_config("tiny", dense_mode="replace")))
    predictor.set_image(rgb_300x400)
    box = [[100, 49, 280, 85]]
    plain = predictor.predict(box, "wire", return_logits=True)
    clicked = predictor.predict(box, "wire", return_logits=True, clicks=[[(150, 60, False)]])
    assert not np.allclose(plain.logits, clicked.logits)  # a negative click is a prompt token
    # one call with a boxed prompt and a clicks-only one (NaN box) = the two calls alone
    nan = [float("nan")] * 4
    both = predictor.predict([box[0], nan], ["wire", "fence"], return_logits=True,
                             clicks=[[(150, 60, False)], [(20, 200, True), (30, 210, True)]])
    alone = predictor.predict([nan], "fence", return_logits=True,
                              clicks=[[(20, 200, True), (30, 210, True)]])
    np.testing.assert_allclose(both.logits[0], clicked.logits[0], atol=1e-4)
    np.testing.assert_allclose(both.logits[1], alone.logits[0], atol=1e-4)
    assert both.masks.shape == (2, 300, 400)


def test_clicks_are_checked(rgb_300x400, tiny_predictor):
    tiny_predictor.set_image(rgb_300x400)
    nan = [float("nan")] * 4
    with pytest.raises(InvalidPromptError, match="needs clicks"):
        tiny_predictor.predict([nan], "wire")
    with pytest.raises(InvalidPromptError, match="outside"):
        tiny_predictor.predict([[1, 1, 50, 50]], "wire", clicks=[[(500, 10, True)]])
    with pytest.raises(InvalidPromptError, match="at least one click"):
        tiny_predictor.predict([[1, 1, 50, 50], nan], "wire", clicks=[[(10, 10, True)], []])
