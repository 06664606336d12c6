import numpy as np
from PIL import Image

from talk2sam.cli import main


def test_segment_writes_mask_and_overlay(tmp_path, capsys):
    image = tmp_path / "wires.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(image)
    assert main(["segment", str(image), "--box", "10", "10", "70", "40", "--text", "wire"]) == 0
    mask = np.asarray(Image.open(tmp_path / "wires_mask.png"))
    assert mask.shape == (60, 80) and set(np.unique(mask)) <= {0, 255}
    overlay = Image.open(tmp_path / "wires_overlay.png")
    assert overlay.size[0] > 300
    assert "wires_overlay.png" in capsys.readouterr().out


def test_segment_without_a_box_finds_each_wire(tmp_path, capsys):
    from tests.e2e.synthetic_images import make_wires_image

    image = make_wires_image(tmp_path / "three.png", seed=3, ground=False)
    assert main(["segment", str(image.path), "--text", "wire"]) == 0
    mask = np.asarray(Image.open(tmp_path / "three_mask.png")) > 0
    for wire in image.masks:  # the union of the regions found covers every wire
        assert np.count_nonzero(mask & wire) >= 0.5 * np.count_nonzero(wire)
    assert "3 box(es)" in capsys.readouterr().out


def test_segment_without_a_box_needs_one_word(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["segment", str(tmp_path / "a.png"), "--text", "wire", "--text", "fence"])
    assert "one --text WORD" in capsys.readouterr().err


def test_segment_reports_missing_weights(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    code = main(["segment", str(image), "--box", "1", "1", "9", "9", "--text", "wire",
                 "--config", "vit_b", "--weights-dir", str(tmp_path)])
    assert code == 2
    assert "sam_hq_vit_b.pth" in capsys.readouterr().err


def test_download_weights_for_one_config_names_only_its_files(tmp_path, capsys):
    from talk2sam.weights import WEIGHT_FILES

    needed = ["sam_hq_vit_tiny.pth", "dinov2_vitb14_reg4_pretrain.pth", "vitb_mlp_infonce.pth",
              "ViT-B-16.pt"]
    for name in needed:  # present already (sparse files of the registered size): no download
        with open(tmp_path / name, "wb") as f:
            f.truncate(WEIGHT_FILES[name].size_bytes or 1)
    assert main(["download-weights", "--config", "vit_tiny-dinob",
                 "--weights-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == needed
    assert all("already present" in line for line in lines)
