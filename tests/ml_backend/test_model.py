"""The model class turns requests into job specs: one job per image, all its boxes, the right
words; answers become brush results. The queue is replaced by a recorder here (its real
behaviour is in test_queue_client.py and test_app.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import redis

from ml_backend.errors import InvalidRequestError
from ml_backend.model import Talk2SamBackend
from ml_backend.ls_format import mask_to_rle
from ml_backend.schemas import BoxPrediction, PredictJobResult, RedisKeys
from ml_backend.settings import Settings
from ml_backend.tokens import TOKEN_TTL_S, collect, token_ref
from tests.ml_backend.conftest import PREFIX, REDIS_URL, load_fixture


class RecordingQueue:
    """Answers every box with a full mask of score 0.5 and records specs and warm jobs."""

    def __init__(self) -> None:
        self.specs = []
        self.warmed = []
        self.redis = redis.Redis.from_url(REDIS_URL)  # /setup records the project there
        self.keys = RedisKeys(PREFIX)

    def predict(self, specs):
        self.specs.append(specs)
        return [PredictJobResult(
            worker="w", model_version="v-worker", width=s.width, height=s.height,
            predictions=[BoxPrediction(rle=mask_to_rle(np.ones((s.height, s.width), bool)),
                                       score=0.5 + 0.1 * i) for i in range(len(s.boxes_xyxy))],
        ) for s in specs]

    def predict_each(self, specs):
        return self.predict(specs)

    def enqueue_warm(self, spec):
        self.warmed.append(spec)
        return True


def backend(**env: str) -> tuple[Talk2SamBackend, RecordingQueue]:
    queue = RecordingQueue()
    return Talk2SamBackend(Settings.from_env(env), queue), queue


def predict(model: Talk2SamBackend, name: str, request_id: str = "r1"):
    body = load_fixture(name)
    return model.predict(body["tasks"], body["params"]["context"],
                         label_config=body["label_config"], project=body["project"],
                         request_id=request_id)


def test_interactive_boxes_go_in_one_spec_with_mapped_words():
    model, queue = backend(LABEL_PROMPTS="wire=power line", LABEL_STUDIO_URL="http://ls:8080")
    body = load_fixture("predict_interactive_request.json")
    second = load_fixture("predict_interactive_request_2.json")["params"]["context"]["result"][0]
    body["params"]["context"]["result"].append(second)
    (prediction,) = model.predict(body["tasks"], body["params"]["context"],
                                  label_config=body["label_config"], request_id="r1")
    ((spec,),) = queue.specs
    assert spec.words == ["power line", "fence"] and spec.task_id == 4
    assert np.allclose(spec.boxes_xyxy, [[100, 49, 280, 85], [40, 222, 200, 291]])
    assert (spec.width, spec.height, spec.ls_url) == (400, 300, "http://ls:8080")
    assert prediction["score"] == pytest.approx(0.55)
    assert [r["value"]["brushlabels"] for r in prediction["result"]] == [["wire"], ["fence"]]
    assert prediction["model_version"] == model.model_version == "v-worker"


def test_setup_credentials_are_used_when_settings_have_none():
    model, queue = backend()
    setup = load_fixture("setup_request.json")
    assert model.setup(**{k: setup[k] for k in ("project", "schema", "hostname",
                                                "access_token")}) == {
        "model_version": "talk2sam-tiny"}
    predict(model, "predict_interactive_request.json")
    spec = queue.specs[0][0]
    assert spec.ls_url == "http://127.0.0.1:8080"
    # the token rides beside the spec, in a short-lived entry, never inside it (nor the AOF's
    # copy of the job)
    assert setup["access_token"] not in json.dumps(spec.to_dict())
    assert collect(queue.redis, queue.keys, spec.ls_token_ref) == setup["access_token"]
    assert 0 < queue.redis.ttl(queue.keys.handed_token(spec.ls_token_ref)) <= TOKEN_TTL_S


def test_the_settings_key_never_travels_and_a_training_token_keeps_its_longer_life():
    model, queue = backend(LABEL_STUDIO_URL="http://127.0.0.1:8080",
                           LABEL_STUDIO_API_KEY="settings-key-0b1c2d")
    setup = load_fixture("setup_request.json")
    model.setup(**{k: setup[k] for k in ("project", "schema", "hostname", "access_token")})
    key = queue.keys.handed_token(token_ref(setup["access_token"]))
    queue.redis.set(key, setup["access_token"], ex=2 * TOKEN_TTL_S)  # as a training job's
    predict(model, "predict_interactive_request.json")
    spec = queue.specs[0][0]
    assert "settings-key" not in json.dumps(spec.to_dict())
    assert not [v for v in queue.redis.mget(queue.redis.keys(queue.keys.handed_token("*")))
                if b"settings-key" in v]
    # /setup's token travels, for a worker started without the key; the worker prefers its own
    assert collect(queue.redis, queue.keys, spec.ls_token_ref) == setup["access_token"]
    assert queue.redis.ttl(key) > TOKEN_TTL_S  # a prediction never shortens it


def test_model_version_pinned_by_setting():
    model, _ = backend(MODEL_VERSION="talk2sam-wires-v3")
    (prediction,) = predict(model, "predict_interactive_request.json")
    assert prediction["model_version"] == "talk2sam-wires-v3"


def test_batch_one_spec_per_task_and_empty_tasks_warm_the_cache():
    model, queue = backend()
    body = load_fixture("predict_batch_request.json")
    body["tasks"].insert(1, load_fixture("predict_on_open_request.json")["tasks"][0])
    results = model.predict(body["tasks"], None, label_config=body["label_config"])
    # the box-less task gets an empty list: Label Studio stores nothing and asks again later
    assert [len(r["result"]) if isinstance(r, dict) else r for r in results] == [1, [], 1, 1]
    assert [s.task_id for s in queue.specs[0]] == [1, 2, 3]
    assert [s.task_id for s in queue.warmed] == [4]


def test_on_open_without_boxes_does_not_wait_for_workers():
    model, queue = backend(WARM_ON_OPEN="false")
    (prediction,) = predict(model, "predict_on_open_request.json")
    assert prediction == [] and queue.specs == [] and queue.warmed == []


def test_interactive_with_several_tasks_is_refused():
    model, _ = backend()
    body = load_fixture("predict_interactive_request.json")
    with pytest.raises(InvalidRequestError, match="one task"):
        model.predict(body["tasks"] * 2, body["params"]["context"],
                      label_config=body["label_config"])


def test_webhook_is_ignored_politely():
    model, _ = backend()
    assert model.fit("TASKS_CREATED", {"action": "TASKS_CREATED", "tasks": [{"id": 1}]}) == {
        "status": "ignored", "event": "TASKS_CREATED"}


def test_extra_params_give_a_project_its_own_prompts():
    """The model's Extra params in Label Studio (sent with /setup) map this project's labels;
    LABEL_PROMPTS stays the default of the others."""
    model, queue = backend(LABEL_PROMPTS="wire=power line", LABEL_STUDIO_URL="http://ls:8080")
    model.setup(project="19.1795635706", extra_params={"label_prompts": {"wire": "guy wire"}})
    model.setup(project="20.1795635706", extra_params=None)
    predict(model, "predict_interactive_request.json")  # project 19
    assert queue.specs[-1][0].words == ["guy wire"]
    body = load_fixture("predict_interactive_request.json")
    model.predict(body["tasks"], body["params"]["context"], label_config=body["label_config"],
                  project="20.1795635706")
    assert queue.specs[-1][0].words == ["power line"]
    model.setup(project="19.1795635706", extra_params='{"label_prompts": {"wire": "cable"}}')
    predict(model, "predict_interactive_request.json")
    assert queue.specs[-1][0].words == ["cable"]  # Label Studio may store them as text


@pytest.mark.parametrize("extra", ["{not json", [1], {"label_prompts": {"wire": ""}},
                                   {"label_prompts": ["wire"]}])
def test_malformed_extra_params_are_refused_at_setup(extra):
    model, _ = backend()
    with pytest.raises(InvalidRequestError, match="extra_params"):
        model.setup(project="19.1", extra_params=extra)


def test_a_projects_prompts_reach_another_web_process_and_no_other_project():
    """Label Studio calls /setup on one process; an interactive box may reach another (or the
    same one after a restart): the project's prompts come from Redis, never from another
    project's /setup."""
    first, _ = backend(LABEL_STUDIO_URL="http://ls:8080")
    first.setup(project="19.1795635706", extra_params={"label_prompts": {"wire": "guy wire"}})
    second, queue = backend(LABEL_STUDIO_URL="http://ls:8080")
    second.setup(project="33.1", extra_params={"label_prompts": {"wire": "fence wire"}})
    predict(second, "predict_interactive_request.json")  # project 19, set up on `first`
    assert queue.specs[-1][0].words == ["guy wire"]
    body = load_fixture("predict_interactive_request.json")
    second.predict(body["tasks"], body["params"]["context"], label_config=body["label_config"],
                   project="41.1")  # never set up anywhere
    assert queue.specs[-1][0].words == ["wire"]


def test_a_request_over_the_pixel_prompt_budget_is_refused_before_it_is_queued():
    model, queue = backend(MAX_PIXEL_PROMPTS=str(400 * 300 - 1))  # the fixture: one 400x300 box
    with pytest.raises(InvalidRequestError, match=r"over MAX_PIXEL_PROMPTS=119999: an image "
                                                  r"this size takes at most 0 prompts"):
        predict(model, "predict_interactive_request.json")
    assert queue.specs == []


# ---------------------------------------------------------------- caps on what a stranger may send


def test_setup_refuses_overlong_fields_and_a_project_that_is_no_id():
    model, _ = backend()
    with pytest.raises(InvalidRequestError, match="at most 2048"):
        model.setup(project="7", hostname="http://" + "a" * 5 * 2**20)
    with pytest.raises(InvalidRequestError, match="project id"):
        model.setup(project="x" * 1000)
    with pytest.raises(InvalidRequestError, match="access_token is longer than 4096"):
        model.setup(project="7", access_token="t" * 5 * 2**20)
    with pytest.raises(InvalidRequestError, match="label_prompts is longer than 65536"):
        model.setup(project="7", extra_params={"label_prompts": {"wire": "w" * 2**20}})
    assert model.setup(project="19.1795635706") == {"model_version": "talk2sam-tiny"}


def test_projects_beyond_the_cap_are_refused_and_known_ones_still_set_up(clean_redis,
                                                                         monkeypatch):
    from ml_backend import model as model_module
    from ml_backend import projects as projects_module

    monkeypatch.setattr(model_module, "MAX_PROJECTS", 3)  # the count in memory
    monkeypatch.setattr(projects_module, "MAX_PROJECTS", 3)  # the count in Redis
    model, queue = backend()
    for project in ("1", "2", "3"):
        model.setup(project=project)
    with pytest.raises(InvalidRequestError, match=r"3 projects already \(MAX_PROJECTS\)"):
        model.setup(project="4")
    model.setup(project="2.17")  # a project it knows: still fine
    assert queue.redis.hlen(queue.keys.projects) == 3
    other, _ = backend()  # another web process: the count in Redis holds there too
    with pytest.raises(InvalidRequestError, match="MAX_PROJECTS"):
        other.setup(project="5")


def test_a_batch_answers_at_most_the_cap_and_logs_its_failures_in_one_line(monkeypatch,
                                                                          caplog):
    from ml_backend import model as model_module

    monkeypatch.setattr(model_module, "MAX_BATCH_TASKS", 30)
    model, queue = backend()
    body = load_fixture("predict_batch_request.json")
    bad = body["tasks"][0]
    bad["predictions"][0]["result"][0]["value"]["rectanglelabels"] = ["no such label"]
    tasks = [{**bad, "id": 100 + i} for i in range(40)]
    with caplog.at_level("WARNING"):
        results = model.predict(tasks, None, label_config=body["label_config"])
    assert results == [[]] * 40 and queue.specs == []
    lines = [r.getMessage() for r in caplog.records]
    assert sum("no prediction" in line for line in lines) == 1
    [line] = [line for line in lines if "no prediction" in line]
    assert "30 of 40 tasks get no prediction: InvalidRequestError x30 (tasks 100, 101, 102, " \
           "103, 104, ...: " in line
    assert any("40 tasks, 30 answered (MAX_BATCH_TASKS)" in line for line in lines)


def test_setup_keeps_the_image_key_of_the_label_config_for_training():
    model, queue = backend()
    schema = load_fixture("setup_request.json")["schema"].replace('value="$image"',
                                                                  'value="$photo"')
    model.setup(project="7.123", schema=schema)
    assert model._project_access("7").image_key == "photo"
    recorded = json.loads(queue.redis.hget(queue.keys.projects, "7"))
    assert recorded["image_key"] == "photo"
    other, _ = backend()  # another web process reads it from Redis
    assert other._project_access("7").image_key == "photo"
