import numpy as np
import torch

from talk2sam import geometry


def test_resized_hw_matches_sam_rounding():
    assert geometry.resized_hw(300, 400, 1024) == (768, 1024)
    assert geometry.resized_hw(1080, 1920, 1024) == (576, 1024)
    assert geometry.resized_hw(400, 300, 256) == (256, 192)


def test_quadrant_map_lands_on_that_quadrant_of_the_mask_frame():
    # a wide 300x400 image: SAM's canvas holds it in the top 768 of 1024 rows
    sim = torch.zeros(1, 8, 8)
    sim[0, 4:, 4:] = 1.0  # bottom-right quadrant in DINOv2's square frame
    frame = geometry.map_to_mask_frame(sim, 300, 400, 1024)[0, 0]
    assert frame.shape == (256, 256)
    # the image occupies rows 0..192 (768 / 4) and all 256 columns; below is padding
    assert float(frame[192:].abs().max()) == 0.0
    # bilinear upsampling blurs one source cell (24 rows, 32 columns here) around the boundary
    assert float(frame[96 + 24:192, 128 + 32:256].min()) > 0.99
    assert float(frame[0:96 - 24, :].max()) < 0.01
    assert float(frame[:192, 0:128 - 32].max()) < 0.01
    rows, cols = torch.nonzero(frame > 0.5, as_tuple=True)
    assert abs(float(rows.float().mean()) - 144) < 3 and abs(float(cols.float().mean()) - 192) < 3


def test_tall_image_pads_on_the_right():
    sim = torch.ones(1, 4, 4)
    frame = geometry.map_to_mask_frame(sim, 400, 300, 1024)[0, 0]
    assert float(frame[:, 192:].abs().max()) == 0.0 and float(frame[:, :192].min()) == 1.0


def test_boxes_to_canvas_and_back_to_original():
    boxes = np.array([[100.0, 49.0, 280.0, 85.0]])  # the captured 400x300 request, in pixels
    canvas = geometry.boxes_to_canvas(boxes, 300, 400, 1024)
    np.testing.assert_allclose(canvas, [[256.0, 125.44, 716.8, 217.6]])


def test_mask_frame_to_original_restores_size_and_position():
    logits = torch.full((1, 1, 256, 256), -10.0)
    logits[0, 0, 0:96, 0:128] = 10.0  # top-left quarter of the image region (rows < 192)
    out = geometry.mask_frame_to_original(logits, 300, 400, 1024)
    assert out.shape == (1, 300, 400)
    mask = (out[0] > 0).numpy()
    assert mask[:140, :190].all() and not mask[160:, :].any() and not mask[:, 210:].any()


def test_box_masks_cover_pixel_centres_inside_the_grown_box():
    masks = geometry.box_masks(np.array([[1.0, 1.0, 3.0, 2.0]]), 4, 5, margin_px=0.0)
    expected = np.zeros((4, 5), bool)
    expected[1:2, 1:3] = True
    np.testing.assert_array_equal(masks[0], expected)
    assert geometry.box_masks(np.array([[1.0, 1.0, 3.0, 2.0]]), 4, 5, 1.0)[0].sum() == 12
