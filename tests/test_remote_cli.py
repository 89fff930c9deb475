"""`python -m nextstep_core generate --server URL ...` against stand-in vLLM-Omni servers: the
local command's output names, the same files from one or two servers, clear errors for what only
a local run has, and nothing written when a server fails."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from vllm_stand_in import stand_ins

from nextstep_core.cli import main
from nextstep_core.presets import PRESETS
from nextstep_core.remote import API_KEY_ENV, HOSTS_ENV

V11 = PRESETS["nextstep1.1"]


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(HOSTS_ENV, raising=False)


def generate(servers, out, *extra) -> int:
    args = ["generate", *[a for s in servers for a in ("--server", s.url)], "--prompt", "a red kite",
            "--width", "64", "--height", "32", "--out", str(out), *map(str, extra)]
    return main(args)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im).copy()


def test_one_and_two_servers_write_the_same_files(tmp_path, capsys):
    with stand_ins(1) as one:
        assert generate(one, tmp_path / "one" / "k.png", "--num-images", 3, "--seed", 5, "--steps", 4) == 0
    with stand_ins(2) as two:
        assert generate(two, tmp_path / "two" / "k.png", "--num-images", 3, "--seed", 5, "--steps", 4) == 0
    names = ["k-0.png", "k-1.png", "k-2.png"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == names
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:  # 8-bit PNGs written from the same decoded pixels: exact
        assert np.array_equal(pixels(tmp_path / "one" / name), pixels(tmp_path / "two" / name))
    assert [b["seed"] for b in two[0].bodies] == [5, 7] and [b["seed"] for b in two[1].bodies] == [6]
    err = capsys.readouterr().err
    assert "3/3 images" in err and "on 2 server(s)" in err and "k-2.png" in err


def test_unset_options_take_nextstep_1_1_settings(tmp_path):
    with stand_ins(1) as (server,):
        assert generate([server], tmp_path / "x.png", "--quiet") == 0
    (body,) = server.bodies
    assert body["seed"] == V11["seed"] and body["num_inference_steps"] == V11["steps"]
    assert body["guidance_scale"] == V11["cfg"] and body["negative_prompt"] == V11["negative"]
    assert body["extra_params"] == {"timesteps_shift": V11["shift"], "use_norm": V11["use_norm"],
                                    "cfg_schedule": V11["cfg_schedule"], "positive_prompt": V11["positive"]}
    assert (tmp_path / "x.png").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--exact"], "--exact is an option of a local run"),
    (["--tokens-out", "t.safetensors"], "--tokens-out is an option of a local run"),
    (["--quant", "int8"], "--quant is an option of a local run"),
    (["--gpu-layers", "4"], "--gpu-layers is an option of a local run"),
    (["--self-cot"], "--self-cot is an option of a local run"),
    (["--sampler", "nextstep1"], "--sampler nextstep1 runs locally only"),
    (["--cfg-schedule", "linear-ramp"], "runs locally only"),
    (["--cfg", "0.5"], "cfg=0.5"),
    (["--model", "other/model"], "not 'other/model'"),
])
def test_local_only_and_bad_options_are_clear_errors(tmp_path, capsys, extra, message):
    with stand_ins(1) as (server,):
        assert generate([server], tmp_path / "x.png", *extra) == 2
    assert message in capsys.readouterr().err
    assert server.bodies == [] and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command", ["edit", "storyboard"])
def test_edit_and_storyboard_stay_local(tmp_path, capsys, command):
    with stand_ins(1) as (server,):
        extra = ["--image", str(tmp_path / "in.png")] if command == "edit" else []
        assert main([command, "--server", server.url, "--prompt", "x", "--out", str(tmp_path / "x.png"), *extra]) == 2
    assert f"`{command}` runs locally only" in capsys.readouterr().err and server.paths == []


def test_a_failing_server_writes_nothing_and_is_named(tmp_path, capsys):
    with stand_ins(1) as (good,), stand_ins(1, fail_at=2) as (bad,):
        assert generate([good, bad], tmp_path / "out" / "k.png", "--num-images", 4) == 2
    err = capsys.readouterr().err
    assert bad.url in err and "CUDA out of memory" in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_local_runs_still_need_a_model(tmp_path, capsys):
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_from_a_shell(tmp_path):
    """The real entry point once (a new process), with the key given in the environment."""
    with stand_ins(1, api_key="k-123") as (server,):
        proc = subprocess.run([sys.executable, "-m", "nextstep_core", "generate", "--server", server.url + "/v1",
                               "--prompt", "a fox", "--width", "32", "--height", "32", "--out", str(tmp_path / "f.png")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**__import__("os").environ, API_KEY_ENV: "k-123", HOSTS_ENV: ""})
    assert proc.returncode == 0, proc.stderr
    assert "k-123" not in proc.stderr and (tmp_path / "f.png").is_file()
