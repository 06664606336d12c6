"""Boxes and clicks as callers give them: refused when unusable, boxes clipped to the image."""

import numpy as np
import pytest

from talk2sam.errors import InvalidPromptError
from talk2sam.prompts import check_boxes, check_clicks


@pytest.mark.parametrize("box, message", [
    ([10, 10, 10, 50], "zero or negative"),
    ([50, 10, 20, 40], "zero or negative"),
    ([float("nan"), 1, 5, 5], "non-finite"),
    ([500, 10, 600, 50], "outside"),
])
def test_check_boxes_rejects_bad_boxes(box, message):
    with pytest.raises(InvalidPromptError, match=message):
        check_boxes(np.array(box), 300, 400)


def test_check_boxes_clips_partly_outside():
    np.testing.assert_allclose(check_boxes([-5, 10, 450, 320], 300, 400),
                               [[0, 10, 400, 300]])


def test_clicks_are_padded_per_prompt_and_refused_outside_the_image():
    coords, labels = check_clicks([[(1.0, 2.0, True)], [(3.0, 4.0, False), (5.0, 6.0, True)]],
                                  2, 300, 400)
    assert coords.shape == (2, 2, 2) and labels.tolist() == [[1, -1], [0, 1]]
    assert check_clicks([[], []], 2, 300, 400) is None
    with pytest.raises(InvalidPromptError, match="outside the 400x300 image"):
        check_clicks([[(401.0, 2.0, True)]], 1, 300, 400)
    with pytest.raises(InvalidPromptError, match="2 prompts but 1"):
        check_clicks([[(1.0, 2.0, True)]], 2, 300, 400)
