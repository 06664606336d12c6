"""Project ids parsed once at the edge, and what the web side keeps of a project in Redis."""

from __future__ import annotations

import pytest

from ml_backend.errors import InvalidRequestError
from ml_backend.projects import ProjectSetup, ProjectStore, parse_project, payload_project
from ml_backend.schemas import RedisKeys
from tests.ml_backend.conftest import PREFIX


@pytest.mark.parametrize("value, parsed", [
    ("19.1795635706", 19), ("19", 19), (19, 19), (None, None), ("", None)])
def test_label_studios_forms_of_a_project_id_are_one_id(value, parsed):
    assert parse_project(value, "/setup") == parsed


@pytest.mark.parametrize("value", ["x", "19.", "-3", -3, True, 1.5, "1" * 19, ["19"]])
def test_anything_else_is_refused_naming_where_it_came(value):
    with pytest.raises(InvalidRequestError, match="/predict project must be"):
        parse_project(value, "/predict")


def test_a_webhook_names_its_project_as_an_object_or_an_id_and_a_bad_one_is_none():
    assert payload_project({"project": {"id": 7, "title": "wires"}}) == 7
    assert payload_project({"project": 7}) == 7
    assert payload_project({"project": "nonsense"}) is None and payload_project({}) is None


def test_a_project_set_up_by_one_process_is_known_to_another_without_its_token(clean_redis):
    store = ProjectStore(clean_redis, RedisKeys(PREFIX))
    assert not store.is_set_up(7)
    store.record(7, ProjectSetup(hostname="http://ls:8080", access_token="secret",
                                 label_prompts={"Power line": "wire"}, image_key="photo"))
    other = ProjectStore(clean_redis, RedisKeys(PREFIX))
    assert other.is_set_up(7) and other.has_room_for(8)
    assert other.recorded(7) == ProjectSetup(hostname="http://ls:8080", access_token=None,
                                             label_prompts={"Power line": "wire"},
                                             image_key="photo")
