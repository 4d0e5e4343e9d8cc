"""Random bytes and random JSON values fed to the encoder and to the reward server: a per-sample error
or a 4xx, never a crash and never a 500."""
import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_fixtures import build_family

from mrrm.data.encoding import SampleError
from mrrm.rl.serve import create_app

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
FIELDS = ("prompt", "responses", "image", "images", "video", "videos", "id", "rankings")
json_samples = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
samples = st.dictionaries(st.sampled_from(FIELDS), json_values | st.binary(max_size=64), max_size=6)


@pytest.fixture(scope="module")
def model():
    return build_family("qwen2_vl").model


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample=samples)
def test_encoder_takes_any_value(model, sample):
    try:
        model.encoder.encode(sample, 0)
    except SampleError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_encoder_takes_any_image_bytes(model, raw):
    b64 = base64.b64encode(raw).decode()
    for image in (raw, "data:image/png;base64," + b64):
        try:
            model.encoder.encode({"prompt": "What is shown?", "responses": ["a cat"], "image": image}, 0)
        except SampleError:
            pass


@pytest.fixture(scope="module")
def client(model):
    from starlette.testclient import TestClient

    with TestClient(create_app(model, timeout=30)) as c:
        yield c


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(("samples", "query", "prompts", "labels", "x")),
                            json_values | st.lists(json_samples, max_size=3), max_size=4),
       path=st.sampled_from(("/score", "/get_reward")))
def test_server_answers_random_json_with_a_4xx_or_200(client, body, path):
    r = client.post(path, content=json.dumps(body))
    assert r.status_code < 500, (r.status_code, r.text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300), path=st.sampled_from(("/score", "/get_reward")))
def test_server_answers_random_bytes_with_a_4xx(client, raw, path):
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(queries=st.lists(st.tuples(st.text(max_size=30), st.text(max_size=30)), min_size=1, max_size=4),
       labels=st.lists(json_values, max_size=4))
def test_get_reward_takes_any_strings(client, queries, labels):
    body = {"query": [p + r for p, r in queries], "prompts": [p for p, _ in queries]}
    if len(labels) == len(queries):
        body["labels"] = labels
    r = client.post("/get_reward", content=json.dumps(body))
    assert r.status_code < 500, (r.status_code, r.text)
