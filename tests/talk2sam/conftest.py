import numpy as np
import pytest

from talk2sam.build import build_model
from talk2sam.predictor import Talk2SamPredictor


@pytest.fixture(scope="session")
def tiny_model():
    return build_model("tiny")


@pytest.fixture()
def tiny_predictor(tiny_model):
    return Talk2SamPredictor(tiny_model)


@pytest.fixture()
def rgb_300x400():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(300, 400, 3), dtype=np.uint8)
