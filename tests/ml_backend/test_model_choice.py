"""Which model the stack serves (ml_backend.model_choice): the environment's, real weights found,
the CPU configuration first without a GPU, else the demo, else the random tiny model."""

from __future__ import annotations

from ml_backend import model_choice


def test_model_from_the_environment_is_kept(tmp_path):
    choice = model_choice.choose_model({"MODEL_CONFIG": "vit_b"}, str(tmp_path), tmp_path / "none.pt")
    assert choice.env == {} and not choice.demo and "MODEL_CONFIG=vit_b" in choice.description


def test_real_weights_in_model_dir_are_found(tmp_path):
    from talk2sam.configs import CONFIGS

    cfg = CONFIGS["vit_b"]
    for name in (cfg.sam_weights, cfg.dino_weights, cfg.psi_weights, cfg.clip_weights):
        (tmp_path / name).write_bytes(b"")
    choice = model_choice.choose_model({}, str(tmp_path), tmp_path / "none.pt", gpu=True)
    assert choice.env == {"MODEL_CONFIG": "vit_b"} and not choice.demo


def test_without_a_gpu_the_cpu_configuration_comes_first(tmp_path):
    from talk2sam.configs import CONFIGS

    for config in ("vit_b", "vit_tiny-dinob"):
        cfg = CONFIGS[config]
        for name in (cfg.sam_weights, cfg.dino_weights, cfg.psi_weights, cfg.clip_weights):
            (tmp_path / name).write_bytes(b"")
    on_gpu = model_choice.choose_model({"DEVICE": "cuda"}, str(tmp_path), tmp_path / "none.pt")
    assert on_gpu.env == {"MODEL_CONFIG": "vit_b"}
    on_cpu = model_choice.choose_model({"DEVICE": "cpu"}, str(tmp_path), tmp_path / "none.pt")
    assert on_cpu.env == {"MODEL_CONFIG": "vit_tiny-dinob"} and "no GPU" in on_cpu.description


def test_demo_checkpoint_then_random_tiny(tmp_path):
    demo = tmp_path / "demo.pt"
    demo.write_bytes(b"")
    with_demo = model_choice.choose_model({}, str(tmp_path), demo)
    assert with_demo.env == {"MODEL_CONFIG": "tiny-768", "MODEL_CHECKPOINT": str(demo)}
    assert with_demo.demo and "synthetic data" in with_demo.description
    demo.unlink()
    random = model_choice.choose_model({}, str(tmp_path), demo)
    assert random.env == {"MODEL_CONFIG": "tiny"} and "RANDOM weights" in random.description
