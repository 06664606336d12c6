"""Official checkpoint layouts, written by the tests at tiny sizes, load strictly; bad files fail
with errors naming the file."""

import numpy as np
import pytest
import torch

from talk2sam import weights
from talk2sam.build import (
    build_model,
    count_params,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    set_trainable,
    untrained_text_warning,
)
from talk2sam.configs import get_config
from talk2sam.errors import ConfigError, WeightsError, WeightsMismatchError, WeightsMissingError
from talk2sam.projection import Projection, rename_psi_keys
from talk2sam.sam_hq import build_sam_hq
from talk2sam.text import build_clip
from talk2sam.vision import build_dino

FILES = dict(sam_weights="tiny_sam_hq.pth", dino_weights="tiny_dinov2_reg4_pretrain.pth",
             psi_weights="tiny_mlp_infonce.pth", clip_weights="tiny_clip.pt")


def tiny_files_config():
    return get_config("tiny").with_changes(name="tiny-files", **FILES)


def official_dinov2_state(timm_state):
    """Invert timm's DINOv2 filter: the facebookresearch layout (register_tokens, mask_token, a
    CLS slot in pos_embed)."""
    state = dict(timm_state)
    dim = state["cls_token"].shape[-1]
    state["register_tokens"] = state.pop("reg_token")
    state["pos_embed"] = torch.cat([torch.zeros(1, 1, dim), state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, dim)
    return state


@pytest.fixture()
def official_files(tmp_path):
    """Write every component in its official layout; return (dir, the written modules)."""
    cfg = tiny_files_config()
    torch.manual_seed(123)
    sam = build_sam_hq(cfg.sam)
    torch.save(sam.state_dict(), tmp_path / FILES["sam_weights"])
    vit = build_dino(cfg.dino)
    torch.save(official_dinov2_state(vit.state_dict()), tmp_path / FILES["dino_weights"])
    psi = Projection(cfg.text_dim, cfg.psi_dim)
    legacy = {k.replace("hidden_layers.0.", "linear_layer2."): v for k, v in psi.state_dict().items()}
    torch.save(legacy, tmp_path / FILES["psi_weights"])  # the older Talk2DINO key names
    clip = build_clip(cfg.clip)
    torch.jit.script(clip).save(str(tmp_path / FILES["clip_weights"]))  # OpenAI ships TorchScript
    return tmp_path, dict(sam=sam, vit=vit, psi=psi, clip=clip)


def test_official_layouts_round_trip(official_files):
    directory, written = official_files
    model = build_model(tiny_files_config(), weights_dir=directory)
    for key, value in written["sam"].state_dict().items():
        assert torch.equal(model.sam.state_dict()[key], value), key
    for key, value in written["psi"].state_dict().items():
        assert torch.equal(model.psi.state_dict()[key], value), key
    vit_state = model.dino.vit.state_dict()
    for key, value in written["vit"].state_dict().items():
        assert torch.allclose(vit_state[key], value), key
    clip_state = model.text.clip.state_dict()
    for key, value in written["clip"].state_dict().items():
        if not key.startswith("visual."):  # the vision tower is dropped after loading
            assert torch.equal(clip_state[key], value), key
    assert model.version == "talk2sam-tiny-files-base-untrained-text"


def test_clip_plain_state_dict_with_openai_metadata_loads(official_files):
    directory, written = official_files
    state = written["clip"].state_dict()
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(49408))
    torch.save(state, directory / FILES["clip_weights"])
    model = build_model(tiny_files_config(), weights_dir=directory)
    assert torch.equal(model.text.clip.ln_final.weight, written["clip"].ln_final.weight)


def test_missing_file_names_file_size_and_source(tmp_path):
    with pytest.raises(WeightsMissingError) as err:
        build_model("vit_b", weights_dir=tmp_path)
    message = str(err.value)
    assert "sam_hq_vit_b.pth" in message and "379,335,069" in message and "lkeab/hq-sam" in message


def test_truncated_official_file_is_refused_naming_both_sizes(tmp_path):
    (tmp_path / "sam_hq_vit_b.pth").write_bytes(b"\0" * 1000)
    with pytest.raises(WeightsError) as err:
        build_model("vit_b", weights_dir=tmp_path)
    message = str(err.value)
    assert "cannot read" in message and "sam_hq_vit_b.pth" in message
    assert "1,000 bytes, the official sam_hq_vit_b.pth 379,335,069" in message
    assert "download it again from Hugging Face lkeab/hq-sam" in message


def registered(monkeypatch, name: str, size: int) -> None:
    """Give a test file a registered size, as the official files have."""
    monkeypatch.setitem(weights.WEIGHT_FILES, name, weights.WeightFile(
        name, "a test file", size, None, None, "the test"))


def test_a_resaved_or_float16_copy_loads_with_a_warning_naming_both_sizes(
        official_files, monkeypatch, caplog):
    directory, written = official_files
    state = written["sam"].state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
               directory / FILES["sam_weights"])  # a float16 copy: other bytes, same keys
    registered(monkeypatch, FILES["sam_weights"], 123_456)
    with caplog.at_level("WARNING", logger="talk2sam.weights"):
        model = build_model(tiny_files_config(), weights_dir=directory)
    assert "the official tiny_sam_hq.pth 123,456" in caplog.text and "float16" in caplog.text
    for key, value in state.items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(model.sam.state_dict()[key], expected), key


def test_own_copies_are_found_by_path(official_files, tmp_path_factory, monkeypatch):
    directory, written = official_files
    elsewhere = tmp_path_factory.mktemp("mine") / "my psi.pth"
    (directory / FILES["psi_weights"]).rename(elsewhere)
    with pytest.raises(WeightsMissingError, match=FILES["psi_weights"]):
        build_model(tiny_files_config(), weights_dir=directory)
    monkeypatch.setenv(weights.OWN_FILES_ENV, f"{FILES['psi_weights']}={elsewhere}")
    model = build_model(tiny_files_config(), weights_dir=directory)
    assert torch.equal(model.psi.state_dict()["linear_layer.weight"],
                       written["psi"].state_dict()["linear_layer.weight"])
    monkeypatch.setenv(weights.OWN_FILES_ENV, "no equals sign")
    with pytest.raises(WeightsError, match="not name=path"):
        build_model(tiny_files_config(), weights_dir=directory)


def test_tinyvit_classifier_keys_may_be_absent_as_upstream_allows(caplog):
    from talk2sam.build import TINYVIT_CLASSIFIER, load_strict

    sam = build_sam_hq(get_config("vit_tiny").sam)
    state = {k: v.clone() for k, v in sam.state_dict().items()
             if not k.startswith(TINYVIT_CLASSIFIER)}
    with pytest.raises(WeightsMismatchError, match="norm_head"):
        load_strict(sam, state, "sam_hq_vit_tiny.pth")
    with caplog.at_level("INFO", logger="talk2sam.build"):
        load_strict(sam, state, "sam_hq_vit_tiny.pth", TINYVIT_CLASSIFIER)
    assert "image_encoder.head.weight" in caplog.text and "never runs" in caplog.text


def test_wrong_architecture_fails_without_loading(official_files):
    directory, _ = official_files
    torch.save(Projection(16, 48).state_dict(), directory / FILES["psi_weights"])
    with pytest.raises(WeightsMismatchError, match="tiny_mlp_infonce.pth"):
        build_model(tiny_files_config(), weights_dir=directory)
    state = torch.load(directory / FILES["sam_weights"])
    state.pop("mask_decoder.hf_token.weight")
    state["extra.key"] = torch.zeros(1)
    torch.save(state, directory / FILES["sam_weights"])
    with pytest.raises(WeightsMismatchError) as err:
        build_model(tiny_files_config(), weights_dir=directory)
    assert "mask_decoder.hf_token.weight" in str(err.value) and "extra.key" in str(err.value)


def test_corrupt_file_gives_clear_error(official_files):
    directory, _ = official_files
    (directory / FILES["psi_weights"]).write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        build_model(tiny_files_config(), weights_dir=directory)


def test_psi_key_renaming_is_pure():
    state = {"linear_layer2.weight": 1, "linear_layer.bias": 2, "module.hidden_layers.0.bias": 3}
    assert rename_psi_keys(state) == {"hidden_layers.0.weight": 1, "linear_layer.bias": 2,
                                      "hidden_layers.0.bias": 3}


def test_parameter_counts_of_real_parts():
    assert count_params(Projection(512, 1024)) == 1_574_912
    sam_b = build_sam_hq(get_config("vit_b").sam)
    assert count_params(sam_b.mask_decoder) == 5_129_444
    assert count_params(sam_b.prompt_encoder.mask_downscaling) == 4_684


def test_trained_parts_checkpoint_round_trip(tmp_path, tiny_model):
    path = save_checkpoint(tiny_model, tmp_path / "v1.pt", version="v1", metrics={"miou": 0.5})
    payload = read_checkpoint(path)
    assert payload["version"] == "v1" and payload["metrics"] == {"miou": 0.5}
    assert payload["config"]["name"] == "tiny"
    loaded = load_checkpoint(path)
    assert loaded.version == "v1"
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_checkpoint_for_another_config_is_refused(tmp_path, tiny_model):
    path = save_checkpoint(tiny_model, tmp_path / "v1.pt", version="v1")
    other = build_model("tiny", use_text=False)
    with pytest.raises(ConfigError, match="trained for config"):
        load_checkpoint(path, model=other)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(WeightsError):
        read_checkpoint(tmp_path / "junk.pt")


def test_a_model_from_public_weights_says_its_text_branch_is_untrained(official_files, tmp_path):
    directory, _ = official_files
    model = build_model(tiny_files_config(), directory)
    assert model.version.endswith("-untrained-text") and not model.text_trained
    warning = untrained_text_warning(model)
    assert "untrained" in warning and "exactly box-only SAM-HQ" in warning
    replace = build_model(tiny_files_config().with_changes(dense_mode="replace"), directory)
    assert "worse than box-only SAM-HQ" in untrained_text_warning(replace)
    assert untrained_text_warning(build_model(tiny_files_config(), directory,
                                              use_text=False)) is None
    path = save_checkpoint(model, tmp_path / "trained.pt", version="team-v1")
    trained = load_checkpoint(path, directory)
    assert trained.text_trained and untrained_text_warning(trained) is None
    assert build_model(tiny_files_config(), directory, use_text=False).version == \
        "samhq-tiny-files-base"


def test_freezing_follows_the_paper(tiny_model):
    model = build_model("tiny")
    params = set_trainable(model, clip_mode="frozen")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("sam.mask_decoder.", "psi.",
                                           "sam.prompt_encoder.mask_downscaling.", "map_gate."))
                             for n in trainable)
    assert {"map_gate.weight", "map_gate.bias"} <= trainable  # residual dense mode's gate
    partial = set_trainable(model, clip_mode="partial")
    assert len(partial) > len(params)
    assert model.text.clip.ln_final.weight.requires_grad
    assert not model.text.clip.token_embedding.weight.requires_grad


def _backward_once(model):
    set_trainable(model, clip_mode="partial")
    model.train()
    rgb = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    feats = model.encode_image(rgb)
    out = model.decode(feats, torch.tensor([[5.0, 5.0, 60.0, 50.0]]), ["wire"])
    (out.low_res_logits.mean() + out.iou.mean()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"trainable {name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def _psi_learns(model):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.psi.parameters())


def test_gradients_reach_only_trainable_parts():
    replace = build_model(get_config("tiny", dense_mode="replace"))
    _backward_once(replace)
    assert _psi_learns(replace)
    # residual: the zero gate learns first; once it is off zero, the text branch behind it does
    residual = build_model("tiny")
    _backward_once(residual)
    assert residual.map_gate.weight.grad.abs().sum() > 0 and not _psi_learns(residual)
    with torch.no_grad():
        residual.map_gate.weight.add_(-1e-2 * residual.map_gate.weight.grad)
    residual.zero_grad()
    _backward_once(residual)
    assert _psi_learns(residual)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    import errno

    path = save_checkpoint(tiny_model, tmp_path / "serving.pt", version="v1")
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tiny_model, path, version="v2")
    assert path.read_bytes() == before and read_checkpoint(path)["version"] == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["serving.pt"]


def test_a_checkpoint_is_on_the_disk_before_its_name_is(tmp_path, tiny_model, monkeypatch):
    """The data is fsynced before the rename, and the folder after it: a power cut leaves the
    old file or the whole new one under the name, never a name over unwritten data."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        ("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)),
                                                     real_replace(a, b))[1])
    save_checkpoint(tiny_model, tmp_path / "v1.pt", version="v1")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]


def test_weights_check_says_what_each_file_is_and_whether_the_config_runs(official_files,
                                                                         monkeypatch, capsys):
    from talk2sam import cli
    from talk2sam.weights_command import check

    directory, _ = official_files
    states, verdict = check(tiny_files_config(), str(directory), load=True)
    assert all(s.present for s in states) and verdict.startswith("runs: every file loaded")
    registered(monkeypatch, FILES["sam_weights"], 999)
    sam = directory / FILES["sam_weights"]
    sam.write_bytes(sam.read_bytes()[:4000])  # truncated
    states, verdict = check(tiny_files_config(), str(directory), load=True)
    assert "the official file 999 (another copy: loading decides)" in states[0].how
    assert verdict.startswith("cannot run: cannot read") and "download it again" in verdict
    (directory / FILES["psi_weights"]).unlink()
    states, verdict = check(tiny_files_config(), str(directory), load=True)
    assert not states[2].present and "1 file(s) missing" in verdict
    assert cli.main(["weights", "check", "--config", "vit_b", "--weights-dir",
                     str(directory)]) == 1
    out = capsys.readouterr().out
    assert "sam_hq_vit_b.pth" in out and "MISSING" in out and "lkeab/hq-sam" in out
