"""Settings: defaults, validation naming the variable, Label Studio's names."""

from __future__ import annotations

import pytest

from ml_backend.settings import Settings, SettingsError, parse_label_prompts


def test_defaults():
    settings = Settings.from_env({})
    assert settings.redis_url == "redis://127.0.0.1:6379/1"
    assert settings.key_prefix == "talk2sam:"
    assert settings.job_timeout_s == 90  # below Label Studio's 100 s predict timeout
    assert settings.model == "talk2sam" and settings.model_config == "tiny"
    assert settings.label_prompts == {} and not settings.basic_auth_enabled


def test_label_studio_names_are_read():
    settings = Settings.from_env({
        "LABEL_STUDIO_URL": "http://ls:8080/", "LABEL_STUDIO_API_KEY": "abc",
        "MODEL_DIR": "/models", "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p",
    })
    assert settings.label_studio_url == "http://ls:8080"
    assert settings.label_studio_api_key == "abc" and settings.model_dir == "/models"
    assert settings.basic_auth_enabled


@pytest.mark.parametrize(("env", "variable"), [
    ({"REDIS_URL": "redis://127.0.0.1:6379/0"}, "REDIS_URL"),
    ({"REDIS_URL": "redis://127.0.0.1:6379"}, "REDIS_URL"),
    ({"REDIS_URL": "http://x"}, "REDIS_URL"),
    ({"JOB_TIMEOUT_S": "100"}, "JOB_TIMEOUT_S"),
    ({"JOB_TIMEOUT_S": "soon"}, "JOB_TIMEOUT_S"),
    ({"QUEUE_MAX_DEPTH": "0"}, "QUEUE_MAX_DEPTH"),
    ({"MODEL": "sam3"}, "MODEL"),
    ({"LABEL_STUDIO_URL": "ls:8080"}, "LABEL_STUDIO_URL"),
    ({"LABEL_PROMPTS": "wire"}, "LABEL_PROMPTS"),
    ({"WARM_ON_OPEN": "maybe"}, "WARM_ON_OPEN"),
    ({"STICKY_WAIT_S": "nan"}, "STICKY_WAIT_S"),
    ({"BASIC_AUTH_USER": "u"}, "BASIC_AUTH_PASS"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"ENCODER_DTYPE": "float16"}, "ENCODER_DTYPE"),
])
def test_bad_values_name_the_variable(env, variable):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert info.value.variable == variable and str(info.value).startswith(variable)


def test_redis_database_other_than_zero_in_path_or_query():
    assert Settings.from_env({"REDIS_URL": "redis://r:6379/3"}).redis_url.endswith("/3")
    assert Settings.from_env({"REDIS_URL": "unix:///tmp/r.sock?db=2"}).redis_url


def test_label_prompts_in_both_forms():
    assert parse_label_prompts("Power line=wire; Fence = fence;") == {
        "Power line": "wire", "Fence": "fence"}
    assert parse_label_prompts('{"Power line": "thin wire"}') == {"Power line": "thin wire"}
    with pytest.raises(ValueError, match="non-empty"):
        parse_label_prompts("Power line=")


def test_torch_threads_is_optional_and_validated():
    assert Settings.from_env({}).torch_threads is None
    assert Settings.from_env({"TORCH_THREADS": "2"}).torch_threads == 2
    with pytest.raises(SettingsError, match="TORCH_THREADS"):
        Settings.from_env({"TORCH_THREADS": "0"})


def test_encoder_dtype_and_the_random_model():
    assert Settings.from_env({}).encoder_dtype == "auto"
    settings = Settings.from_env({"ENCODER_DTYPE": "float32", "MODEL": "random"})
    assert settings.encoder_dtype == "float32" and settings.model == "random"


def test_commands_name_the_invalid_variable(capsys):
    from ml_backend.settings import settings_for_command

    assert settings_for_command({"JOB_TIMEOUT_S": "500"}) is None
    assert "JOB_TIMEOUT_S" in capsys.readouterr().err
    assert settings_for_command({}) == Settings.from_env({})


def test_label_studio_example_names_are_aliases():
    settings = Settings.from_env({"LABEL_STUDIO_HOST": "http://ls:8080/",
                                  "LABEL_STUDIO_ACCESS_TOKEN": "tok"})
    assert (settings.label_studio_url, settings.label_studio_api_key) == ("http://ls:8080", "tok")
    both = Settings.from_env({"LABEL_STUDIO_URL": "http://a:1", "LABEL_STUDIO_HOST": "http://b:2"})
    assert both.label_studio_url == "http://a:1"  # our own name wins


def test_one_weights_folder_for_the_library_and_the_workers():
    # MODEL_DIR is read by both; the older TALK2SAM_WEIGHTS_DIR only where MODEL_DIR is unset
    from talk2sam.weights import DEFAULT_WEIGHTS_DIR, weights_dir

    assert Settings.from_env({}).model_dir == str(DEFAULT_WEIGHTS_DIR) == str(weights_dir(env={}))
    for env in ({"MODEL_DIR": "/w"}, {"TALK2SAM_WEIGHTS_DIR": "/w"},
                {"MODEL_DIR": "/w", "TALK2SAM_WEIGHTS_DIR": "/old"}):
        assert Settings.from_env(env).model_dir == "/w" == str(weights_dir(env=env))


def test_allowlist_setting_is_parsed_and_checked():
    env = {"IMAGE_HOST_ALLOWLIST": " CDN.example, img.example:8443 ,"}
    assert Settings.from_env(env).image_host_allowlist == ("cdn.example", "img.example:8443")
    assert Settings.from_env({}).image_host_allowlist == ()
    with pytest.raises(SettingsError, match="IMAGE_HOST_ALLOWLIST"):
        Settings.from_env({"IMAGE_HOST_ALLOWLIST": "http://cdn.example/path"})


def test_auth_and_size_settings():
    defaults = Settings.from_env({})
    assert (defaults.api_token, defaults.max_request_bytes) == (None, 20 * 2**20)
    assert not defaults.auth_enabled
    custom = Settings.from_env({"API_TOKEN": "t", "MAX_REQUEST_BYTES": "4096"})
    assert (custom.api_token, custom.max_request_bytes) == ("t", 4096)
    assert custom.auth_enabled
    for name, bad in (("MAX_REQUEST_BYTES", "10"), ("MAX_REQUEST_BYTES", "20MB"),
                      ("ANNOTATION_STORE_MB", "0"), ("TRAIN_QUEUE_TTL_S", "1")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: bad})
