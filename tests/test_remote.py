"""Drawing on vLLM-Omni servers: request bodies field by field, images spread over servers (and
the same whatever their number), the checks before sending, every failure, Cancel. Against
stand-in servers on 127.0.0.1 (tests/vllm_stand_in.py); each test stops its own."""
from __future__ import annotations

import re
import socket
import time

import numpy as np
import pytest
from PIL import Image
import torch

from vllm_stand_in import NEXTSTEP, StandIn, picture, stand_ins

from nextstep_core.engine import SamplingSettings
from nextstep_core.errors import NextStepError, SettingsError
from nextstep_core.pipeline import Request
from nextstep_core.reasoning import ReasoningSettings
from nextstep_core.remote import API_KEY_ENV, HOSTS_ENV, START_HINT, draw, parse_servers
from nextstep_core.remote.servers import ServerError, describe_detail


def request(**over) -> Request:
    sampling = over.pop("sampling", {})
    s = SamplingSettings(**{"cfg": 7.5, "steps": 30, "shift": 1.0, "sampler": "nextstep1.1", **sampling})
    return Request(**{"prompts": ["a red kite"], "width": 64, "height": 32, "positive": "", "negative": "lowres",
                      "images_per_prompt": 1, "seed": 42, "sampling": s, **over})


def urls(servers) -> list:
    return [s.url for s in servers]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(HOSTS_ENV, raising=False)


def test_request_bodies_field_by_field():
    req = request(prompts=["a red kite", "a blue boat"], images_per_prompt=2, seed=7, positive="sharp",
                  negative="blurry", width=48, height=80,
                  sampling={"cfg": 3.5, "steps": 12, "shift": 2.5, "use_norm": True, "cfg_schedule": "linear"})
    with stand_ins(1) as (server,):
        result = draw([server.url], req)
    assert server.paths[:2] == [("GET", "/health"), ("GET", "/v1/models")]
    assert server.paths[2:] == [("POST", "/v1/images/generations")] * 4
    expected = [{
        "model": NEXTSTEP, "prompt": prompt, "negative_prompt": "blurry", "size": "48x80", "n": 1,
        "num_inference_steps": 12, "guidance_scale": 3.5, "seed": seed, "response_format": "b64_json",
        "extra_params": {"timesteps_shift": 2.5, "use_norm": True, "cfg_schedule": "linear", "positive_prompt": "sharp"},
    } for prompt, seed in (("a red kite", 7), ("a red kite", 8), ("a blue boat", 9), ("a blue boat", 10))]
    assert server.bodies == expected
    assert all("Authorization" not in h for h in server.headers)
    assert result.seeds == [7, 8, 9, 10] and result.model == NEXTSTEP
    # the decoded batch is the stand-in's pictures, in order (uint8 / 255 both ways: exact)
    want = torch.stack([torch.from_numpy(np.array(picture(b))).float() / 255 for b in expected])
    assert result.images.shape == (4, 80, 48, 3) and torch.equal(result.images, want)


def vllm_omni_request_model():
    """vLLM-Omni's own ImageGenerationRequest, when it can be imported here without vllm: from an
    installed package, or from its two files (protocol/images.py and the helper it imports) in an
    unpacked wheel on the path. None otherwise."""
    import importlib
    import importlib.util
    import sys
    try:
        return importlib.import_module("vllm_omni.entrypoints.openai.protocol.images").ImageGenerationRequest
    except Exception:
        pass
    try:
        spec = importlib.util.find_spec("vllm_omni")
        importlib.import_module("fastapi")
        importlib.import_module("pydantic")
    except Exception:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    base = __import__("pathlib").Path(list(spec.submodule_search_locations)[0]) / "entrypoints" / "openai"
    saved = {k: sys.modules.get(k) for k in ("vllm_omni.entrypoints.openai.image_api_utils", "_vo_images")}
    try:
        for name, path in (("vllm_omni.entrypoints.openai.image_api_utils", base / "image_api_utils.py"),
                           ("_vo_images", base / "protocol" / "images.py")):
            s = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(s)
            sys.modules[name] = module
            s.loader.exec_module(module)
        return sys.modules["_vo_images"].ImageGenerationRequest
    except Exception:
        return None
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_bodies_are_valid_for_vllm_omnis_own_request_model():
    model = vllm_omni_request_model()
    if model is None:
        pytest.skip("vllm_omni's ImageGenerationRequest cannot be imported here (optional check)")
    req = request(prompts=["a kite"], images_per_prompt=2, seed=2 ** 63 - 2,
                  sampling={"cfg": 20.0, "steps": 200, "cfg_schedule": "linear", "use_norm": True})
    with stand_ins(1) as (server,):
        draw([server.url], req)
    for body in server.bodies:
        parsed = model.model_validate(body)
        assert parsed.model_dump(include=set(body), mode="json") == body


@pytest.mark.parametrize("count", [2, 3])
def test_servers_share_a_batch_and_give_the_same_images_as_one(count):
    req = request(prompts=["a", "b"], images_per_prompt=3, seed=100)
    with stand_ins(1) as (one,):
        alone = draw([one.url], req)
    with stand_ins(count) as servers:
        seen = []
        shared = draw(urls(servers), req, on_progress=seen.append)
    assert torch.equal(alone.images, shared.images)  # PNG bytes decoded twice: integers, so exact
    assert sorted(b["seed"] for s in servers for b in s.bodies) == list(range(100, 106))
    for k, s in enumerate(servers):  # image i on server i mod count, in order
        assert [b["seed"] - 100 for b in s.bodies] == list(range(k, 6, count))
    assert shared.drawn_by == [servers[i % count].url for i in range(6)]
    last = seen[-1]
    assert last.done == last.total == [len(range(k, 6, count)) for k in range(count)]
    assert all(f"{s.url}: {len(range(k, 6, count))}/{len(range(k, 6, count))}" in last.describe()
               for k, s in enumerate(servers))
    assert seen[0].done == [0] * count


def test_requests_run_in_parallel_across_servers():
    """Each of two servers holds its one-second request during the other's (not one after the other)."""
    with stand_ins(2, delay=1.0) as servers:
        draw(urls(servers), request(images_per_prompt=2))
    (a,), (b,) = servers[0].spans, servers[1].spans
    assert max(a[0], b[0]) < min(a[1], b[1])


@pytest.mark.parametrize("over, message", [
    (dict(width=100), "width=100 is not a multiple of 16"),
    (dict(sampling={"cfg": 0.5}), "cfg=0.5"),
    (dict(sampling={"cfg": 25.0}), "cfg=25.0: vLLM-Omni takes cfg from 1 (guidance off) to 20"),
    (dict(sampling={"steps": 0}), "steps=0"),
    (dict(sampling={"steps": 300}), "steps=300 is above 200"),  # the engine's range is the server's
    (dict(prompts=[]), "No prompt given"),
    (dict(prompts=["  "]), "No prompt given"),
    (dict(sampling={"cfg_schedule": "linear-ramp"}), "runs locally only"),
    (dict(sampling={"sampler": "nextstep1"}), "sampler='nextstep1' runs locally only"),
    (dict(reasoning=ReasoningSettings(mode="think")), "Self-CoT runs locally only"),
    (dict(seed=2 ** 63 - 1, images_per_prompt=2), "seeds up to 2^63-1"),
    (dict(edit_images=[Image.new("RGB", (32, 32))]), "edits run locally"),
])
def test_bad_settings_are_refused_before_anything_is_sent(over, message):
    with stand_ins(1) as (server,):
        with pytest.raises(SettingsError, match=re.escape(message)):
            draw([server.url], request(**over))
    assert server.paths == []


@pytest.mark.parametrize("text, message", [
    ("", "No server given"),
    ("ftp://host:8091", "is not a server's base URL"),
    ("localhost:8091", "is not a server's base URL"),
    ("http://host:80x", "invalid port"),
    ("http://a:1 http://a:1/", "listed twice"),
])
def test_bad_server_urls(text, message):
    with pytest.raises(ServerError, match=message):
        parse_servers(text)


def test_server_lists_from_a_widget_or_a_list():
    assert parse_servers("http://a:8091\nhttp://b:8091/v1, https://c/api/") == \
        ["http://a:8091", "http://b:8091", "https://c/api"]
    assert parse_servers(["http://a:1/"]) == ["http://a:1"]


def test_a_server_that_is_down_fails_at_once_naming_it():
    url = f"http://127.0.0.1:{free_port()}"
    with stand_ins(1) as (up,):
        with pytest.raises(ServerError) as info:
            draw([up.url, url], request())
    assert url in str(info.value) and START_HINT in str(info.value)
    assert [p for p in up.paths if p[0] == "POST"] == []


@pytest.mark.parametrize("kwargs, model, message", [
    (dict(health=503), None, "is up but not ready: /health answered 503"),
    (dict(model="Qwen/Qwen-Image"), None, "serves Qwen/Qwen-Image, which is not NextStep-1.1"),
    (dict(model="stepfun-ai/NextStep-1-Large"), None, "which is not NextStep-1.1"),
    (dict(), "my-nextstep", f"serves {NEXTSTEP}, not 'my-nextstep'"),
])
def test_wrong_or_unready_server_fails_at_once_naming_it(kwargs, model, message):
    with stand_ins(1, **kwargs) as (server,):
        with pytest.raises(ServerError, match=message) as info:
            draw([server.url], request(), model=model)
    assert server.url in str(info.value) and server.bodies == []


def test_a_url_that_is_not_vllm_says_so():
    with stand_ins(1) as (server,):
        with pytest.raises(ServerError, match="no /health route"):
            draw([server.url + "/somewhere"], request())


def test_served_names_that_are_accepted():
    """Another name for NextStep-1.1 works when given as the model; a local folder path is recognised."""
    with stand_ins(1, model="house-model", root="/models/NextStep-1.1") as (by_root,):
        assert draw([by_root.url], request()).model == "house-model"
    with stand_ins(1, model="house-model", root="house-model") as (named,):
        assert draw([named.url], request(), model="house-model").model == "house-model"
        assert named.bodies[0]["model"] == "house-model"


def test_servers_of_different_models_are_refused():
    with StandIn() as a, StandIn(model="stepfun-ai/NextStep-1.1-Pretrain") as b:
        with pytest.raises(ServerError, match="serve different models"):
            draw([a.url, b.url], request())
        assert a.bodies == b.bodies == []


def test_a_server_failing_mid_run_fails_the_run_with_its_name_and_detail():
    with StandIn() as good, StandIn(fail_at=2, delay=0.05) as bad:
        with pytest.raises(ServerError) as info:
            draw([good.url, bad.url], request(images_per_prompt=6))
    text = str(info.value)
    assert bad.url in text and "CUDA out of memory" in text and "500" in text and good.url not in text
    assert len(bad.bodies) == 2  # no retry on the failed server nor elsewhere
    assert len(good.bodies) <= 3


def test_an_unreadable_image_is_an_error_naming_the_server():
    with stand_ins(1, bad_image=True) as (server,):
        with pytest.raises(ServerError, match="cannot be read") as info:
            draw([server.url], request())
    assert server.url in str(info.value)


def test_timeout_is_settable_and_named():
    with stand_ins(1, delay=5.0) as (server,):
        with pytest.raises(ServerError, match="no answer within 0.3 s.*raise the server timeout"):
            draw([server.url], request(), timeout=0.3)


def test_api_key_from_the_environment_as_a_bearer_token_and_never_shown(monkeypatch):
    secret = "sk-test-" + "x" * 12
    with stand_ins(1, api_key=secret) as (server,):
        monkeypatch.setenv(HOSTS_ENV, server.url)  # trusted with the key (test_remote_trust.py: the rest)
        with pytest.raises(ServerError, match=f"401.*set the environment variable {API_KEY_ENV}"):
            draw([server.url], request())
        monkeypatch.setenv(API_KEY_ENV, "wrong-" + secret[::-1])
        with pytest.raises(ServerError) as info:
            draw([server.url], request())
        assert f"the key in {API_KEY_ENV} is not the server's --api-key" in str(info.value)
        assert secret[::-1] not in str(info.value) and secret not in str(info.value)
        monkeypatch.setenv(API_KEY_ENV, secret)
        result = draw([server.url], request())
    assert result.images.shape == (1, 32, 64, 3)
    assert server.headers[-1]["Authorization"] == f"Bearer {secret}"
    assert secret not in repr(result) and secret not in repr(draw)


def test_error_details_as_fastapi_and_vllm_write_them():
    assert describe_detail({"detail": [{"loc": ["body", "n"], "msg": "too big", "type": "x"}]}, "") == "body.n: too big"
    assert describe_detail({"detail": "Model mismatch"}, "") == "Model mismatch"
    assert describe_detail({"error": {"message": "bad size", "code": 400}}, "") == "bad size"
    assert describe_detail(None, "<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"


def test_cancel_stops_waiting_at_once_and_sends_nothing_more():
    """check() raises while both servers hold a 20 s request: the run stops, both connections are
    closed (the stand-ins see the hang-up), and the other images are never sent."""
    class Stop(BaseException):
        pass

    calls = []

    def check():  # Cancel once both requests are on their servers (or after 10 s of polls)
        calls.append(1)
        if all(s.bodies for s in servers) or len(calls) > 100:
            raise Stop()

    with stand_ins(2, delay=20.0) as servers:
        with pytest.raises(Stop):
            draw(urls(servers), request(images_per_prompt=6), check=check)
        for _ in range(100):  # up to 5 s for the stand-ins to notice
            if sum(s.hung_up for s in servers) == 2:
                break
            time.sleep(0.05)
        assert [s.hung_up for s in servers] == [1, 1]
        assert [len(s.bodies) for s in servers] == [1, 1]


def test_remote_errors_are_nextstep_errors():
    """The CLI and the nodes show these as user errors (no traceback)."""
    assert issubclass(ServerError, NextStepError)


def test_cancel_also_works_while_a_server_is_being_checked():
    """A host that takes the connection but never answers /health: Cancel ends the wait (without
    it the check would end only at its 15 s timeout, with a ServerError instead)."""
    class Stop(BaseException):
        pass

    calls = []

    def check():
        calls.append(1)
        if len(calls) >= 3:
            raise Stop()

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        with pytest.raises(Stop):
            draw([f"http://127.0.0.1:{silent.getsockname()[1]}"], request(), check=check)
