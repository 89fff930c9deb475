"""NextStep Server feeding NextStep Text to Image, called the way ComfyUI calls nodes, against
stand-in vLLM-Omni servers: the same graph with the model from a server instead of the loaders,
status text and progress while waiting, Cancel, and the errors of a mixed or local-only graph."""
from __future__ import annotations

import sys
import time
import types

import pytest
import torch

from host_stand_in import Interrupted, host, models_dir, pack  # noqa: F401
from vllm_stand_in import stand_ins

from nextstep_core.remote import API_KEY_ENV, HOSTS_ENV


def call(cls, **kwargs):
    return getattr(cls(), cls.FUNCTION)(**kwargs)


def result_of(out):
    return out["result"] if isinstance(out, dict) else out


def defaults(cls) -> dict:
    return {n: s[1]["default"] if "default" in s[1] else s[0][0] for n, s in cls.INPUT_TYPES()["required"].items()
            if isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")}


def server_parts(pack, servers, **over):
    cls = pack.NODE_CLASS_MAPPINGS["NextStepServer"]
    args = {**defaults(cls), "servers": "\n".join(s.url for s in servers), **over}
    return result_of(call(cls, **args))


def t2i(pack, parts, **over):
    cls = pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"]
    args = {**defaults(cls), **dict(zip(("backbone", "flow_head", "vae"), parts)), "prompt": "a red kite",
            "width": 64, "height": 32, "steps": 3, "unique_id": "7", **over}
    return call(cls, **args)


@pytest.fixture
def status(monkeypatch):
    """ComfyUI's PromptServer, recording the status texts the node sends."""
    texts = []
    module = types.ModuleType("server")
    module.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(
        send_progress_text=lambda text, node_id, sid=None: texts.append((str(node_id), text))))
    monkeypatch.setitem(sys.modules, "server", module)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(HOSTS_ENV, raising=False)
    return texts


def test_server_node_declares_the_three_model_sockets_and_no_secret(pack):
    cls = pack.NODE_CLASS_MAPPINGS["NextStepServer"]
    t2i_inputs = pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"].INPUT_TYPES()["required"]
    assert cls.RETURN_TYPES == tuple(t2i_inputs[n][0] for n in ("backbone", "flow_head", "vae"))
    assert list(cls.INPUT_TYPES()["required"]) == ["servers", "model", "timeout"]
    assert not any(w in n for n in cls.INPUT_TYPES()["required"] for w in ("key", "token", "secret", "password"))
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["NextStepServer"] == "NextStep Server (vLLM-Omni)"


def test_one_and_two_servers_draw_the_same_batch_with_status_and_progress(pack, host, status):
    with stand_ins(1) as one:
        alone = result_of(t2i(pack, server_parts(pack, one), batch_size=3, seed=11))
    with stand_ins(2) as two:
        out = t2i(pack, server_parts(pack, two), batch_size=3, seed=11)
    images, reasoning = result_of(out)
    assert images.shape == (3, 32, 64, 3) and images.dtype == torch.float32 and reasoning == ""
    assert torch.equal(images, alone[0])  # decoded 8-bit PNGs: exact
    assert [b["seed"] for b in two[0].bodies] == [11, 13] and [b["seed"] for b in two[1].bodies] == [12]
    assert (3, 3, None, "7") in host.progress and host.progress[-1][:2] == (3, 3)
    final = status[-1]
    assert final[0] == "7" and "3/3 images" in final[1]
    assert f"{two[0].url}: 2/2" in final[1] and f"{two[1].url}: 1/1" in final[1]


def test_widgets_reach_the_request(pack, host, status):
    with stand_ins(1) as (server,):
        t2i(pack, server_parts(pack, [server]), prompt="a fox", positive_prompt="", negative_prompt="blurry",
            cfg=4.0, steps=9, timesteps_shift=1.5, use_norm=True, cfg_schedule="linear", seed=3, width=48, height=16)
    (body,) = server.bodies
    assert {k: body[k] for k in ("prompt", "negative_prompt", "size", "guidance_scale", "num_inference_steps",
                                 "seed", "n")} == {"prompt": "a fox", "negative_prompt": "blurry", "size": "48x16",
                                                   "guidance_scale": 4.0, "num_inference_steps": 9, "seed": 3, "n": 1}
    assert body["extra_params"] == {"timesteps_shift": 1.5, "use_norm": True, "cfg_schedule": "linear",
                                    "positive_prompt": ""}


def test_runs_without_comfyui(pack, monkeypatch):
    for name in ("comfy", "comfy.model_management", "comfy.utils", "folder_paths", "server"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with stand_ins(1) as servers:
        images, _ = result_of(t2i(pack, server_parts(pack, servers)))
    assert images.shape == (1, 32, 64, 3)


def test_cancel_stops_waiting_and_sends_nothing_more(pack, host, status):
    with stand_ins(2, delay=20.0) as servers:
        # Cancel pressed once both requests are on their servers (progress is reported every second)
        host.on_progress = lambda value, total: setattr(host, "interrupted", all(s.bodies for s in servers))
        with pytest.raises(Interrupted):
            t2i(pack, server_parts(pack, servers), batch_size=4)
        for _ in range(100):  # up to 5 s for the stand-ins to notice the hang-up
            if sum(s.hung_up for s in servers) == 2:
                break
            time.sleep(0.05)
        assert [s.hung_up for s in servers] == [1, 1] and [len(s.bodies) for s in servers] == [1, 1]


@pytest.mark.parametrize("over, message", [
    (dict(self_cot=True), "Self-CoT runs locally only"),
    (dict(reasoning="it is red"), "Self-CoT runs locally only"),
    (dict(sampler="ode"), "sampler='ode' runs locally only"),
    (dict(cfg_schedule="linear-ramp"), "runs locally only"),
])
def test_local_only_widgets_are_clear_errors(pack, host, status, over, message):
    with stand_ins(1) as servers:
        with pytest.raises(pack.nextstep_core.errors.SettingsError, match=message):
            t2i(pack, server_parts(pack, servers), **over)
    assert servers[0].paths == []


def test_sampler_auto_and_the_models_own_sampler_are_accepted(pack, host, status):
    with stand_ins(1) as servers:
        for sampler in ("auto", "nextstep1.1"):
            assert result_of(t2i(pack, server_parts(pack, servers), sampler=sampler))[0].shape[0] == 1


def test_mixed_graphs_and_local_only_nodes_say_what_to_connect(pack, host, status):
    from test_nodes import load_parts
    local = load_parts(pack)
    with stand_ins(1) as servers:
        remote = server_parts(pack, servers)
        with pytest.raises(pack.nextstep_core.errors.SettingsError, match="connect all three inputs to one NextStep Server node"):
            t2i(pack, (remote[0], local[1], local[2]))
        edit = pack.NODE_CLASS_MAPPINGS["NextStepEdit"]
        args = {**defaults(edit), **dict(zip(("backbone", "flow_head", "vae"), remote)),
                "image": torch.rand(1, 32, 32, 3), "instruction": "make it blue", "size": 64}
        with pytest.raises(pack.nextstep_core.errors.SettingsError, match="edits and storyboards run locally"):
            call(edit, **args)
    assert servers[0].bodies == []


def test_bad_server_widget_values(pack):
    NextStepError = pack.nextstep_core.errors.NextStepError  # the pack's own classes (loaded as ComfyUI does)
    cls = pack.NODE_CLASS_MAPPINGS["NextStepServer"]
    with pytest.raises(NextStepError, match="No server given"):
        call(cls, servers="  ", model="", timeout=60)
    with pytest.raises(NextStepError, match="not a server's base URL"):
        call(cls, servers="127.0.0.1:8091", model="", timeout=60)


def test_server_example_is_the_local_example_with_the_model_from_a_server(pack):
    import json
    from host_stand_in import ROOT
    wf = json.loads((ROOT / "workflows" / "nextstep_t2i_server.json").read_text(encoding="utf-8"))
    local = json.loads((ROOT / "workflows" / "nextstep_t2i.json").read_text(encoding="utf-8"))
    nodes = {n["id"]: n for n in wf["nodes"]}
    (t2i_node,) = [n for n in wf["nodes"] if n["type"] == "NextStepTextToImage"]
    (server,) = [n for n in wf["nodes"] if n["type"] == "NextStepServer"]
    sources = {l[4]: (nodes[l[1]]["type"], l[2]) for l in wf["links"] if l[3] == t2i_node["id"]}
    assert sources == {0: ("NextStepServer", 0), 1: ("NextStepServer", 1), 2: ("NextStepServer", 2)}
    assert {n["type"] for n in wf["nodes"]} - {"NextStepServer"} == {n["type"] for n in local["nodes"]} - {
        "NextStepBackboneLoader", "NextStepFlowHeadLoader", "NextStepVAELoader"}
    v11 = pack.nextstep_core.presets.PRESETS["nextstep1.1"]
    names = [n for n in defaults(pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"])]
    values = dict(zip(names[:12], t2i_node["widgets_values"][:12]))
    assert {k: values[k] for k in ("positive_prompt", "negative_prompt", "steps", "cfg", "sampler", "self_cot")} == {
        "positive_prompt": v11["positive"], "negative_prompt": v11["negative"], "steps": v11["steps"],
        "cfg": v11["cfg"], "sampler": "auto", "self_cot": False}
    (note,) = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note"]
    assert "vllm serve stepfun-ai/NextStep-1.1 --omni --port 8091" in note and API_KEY_ENV in note and HOSTS_ENV in note
    assert "--cfg-parallel-size 2" in note and "--tensor-parallel-size 2" in note
    assert server["widgets_values"][0].startswith("http://")
