"""Bad numbers sent through the API (a script, a hand-edited workflow), checked as ComfyUI checks a
queued prompt (prompt_validation.py) and then as the node runs: NaN and infinities are refused with
a message naming the value, and every message lands on the input it is about."""
import math

import pytest
import torch

from host_stand_in import host, models_dir, pack  # noqa: F401
from prompt_validation import validate_widgets
from test_nodes import call, load_parts, widget_defaults

GENERATING = ["NextStepTextToImage", "NextStepEdit", "NextStepStoryboard", "NextStepStoryStart"]
BAD_FLOATS = [float("nan"), float("inf"), float("-inf")]


def float_inputs(cls) -> list:
    types = cls.INPUT_TYPES()
    return [n for sect in ("required", "optional") for n, s in types.get(sect, {}).items() if s[0] == "FLOAT"]


def node_args(pack, name, parts, **over):
    """Everything the node's FUNCTION takes: widget defaults, the models, small sizes."""
    args = {**widget_defaults(pack.NODE_CLASS_MAPPINGS[name]), **dict(zip(("backbone", "flow_head", "vae"), parts))}
    args.update(steps=2, **({"size": 32} if name == "NextStepEdit" else {"width": 32, "height": 32}))
    if name == "NextStepEdit":
        args["image"] = torch.rand(1, 32, 32, 3)
    if name == "NextStepStoryboard":
        args["panels"] = "a fox"
    return {**args, **over}


def test_defaults_pass_validation(pack, host):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        values = {k: v for k, v in widget_defaults(cls).items() if v is not None}
        assert validate_widgets(cls, values) == [], name


def test_every_float_message_lands_on_its_own_input(pack, host):
    """Across all nodes: ComfyUI's range check reports an infinity on the input itself; nothing
    reports a bad float against another input."""
    checked = 0
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        defaults = {k: v for k, v in widget_defaults(cls).items() if v is not None}
        for inp in float_inputs(cls):
            for bad in BAD_FLOATS:
                errors = validate_widgets(cls, {**defaults, inp: bad})
                assert {e[0] for e in errors} <= {inp}, (name, inp, bad, errors)
                if math.isinf(bad):
                    assert errors and str(bad) in errors[0][1], (name, inp, errors)
                checked += 1
    assert checked >= 3 * 6  # cfg, cfg_img, timesteps_shift on the four generating nodes


@pytest.mark.parametrize("name", GENERATING)
def test_nan_is_refused_when_the_node_runs_naming_the_value(pack, host, name):
    """NaN passes ComfyUI's min/max check (every comparison with NaN is false), so the node itself
    refuses it, before any work; it used to sample black images."""
    cls = pack.NODE_CLASS_MAPPINGS[name]
    parts = load_parts(pack, "NextStep-1-Large-Edit" if name == "NextStepEdit" else "NextStep-1-Large")
    SettingsError = pack.nextstep_core.errors.SettingsError
    for inp in float_inputs(cls):
        args = node_args(pack, name, parts, **{inp: float("nan")})
        assert validate_widgets(cls, {k: v for k, v in args.items() if k in widget_defaults(cls)}) == []
        with pytest.raises(SettingsError, match=rf"^{inp}=nan is not a finite number\. Use a value between "):
            call(cls, **args)


def test_cfg_nan_in_the_engine_is_not_called_below_1(pack):
    SettingsError = pack.nextstep_core.errors.SettingsError
    settings = pack.nextstep_core.engine.SamplingSettings
    with pytest.raises(SettingsError, match=r"^cfg=nan is not a finite number"):
        settings(cfg=float("nan"), cfg_img=1.0)
    with pytest.raises(SettingsError, match=r"^cfg_img=inf is not a finite number"):
        settings(cfg=7.5, cfg_img=float("inf"))
    with pytest.raises(SettingsError, match=r"^cfg=0\.5 is below 1"):
        settings(cfg=0.5, cfg_img=1.0)


@pytest.mark.parametrize("name", ["NextStepTextToImage", "NextStepStoryboard", "NextStepStoryStart"])
def test_a_bad_width_is_reported_on_width_only(pack, host, name):
    cls = pack.NODE_CLASS_MAPPINGS[name]
    defaults = {k: v for k, v in widget_defaults(cls).items() if v is not None}
    for inp, other in (("width", "height"), ("height", "width")):
        for bad, message in ((8, "Value 8 smaller than min of 16"), (4096, "Value 4096 bigger than max of 2048")):
            assert validate_widgets(cls, {**defaults, inp: bad}) == [(inp, message)]
        # off the 16-px grid: within the declared range, so refused when the node runs, naming the input
        assert validate_widgets(cls, {**defaults, inp: 1000}) == []
        parts = load_parts(pack)
        with pytest.raises(pack.nextstep_core.errors.SettingsError, match=rf"^{inp}=1000 is not a multiple of 16") as info:
            call(cls, **node_args(pack, name, parts, **{inp: 1000}))
        assert other not in str(info.value)


def test_edit_size_is_checked_once_and_reported_on_size_only(pack, host):
    """Out of range: ComfyUI's own check, on `size`. Off the 16-px grid: the request, as it is made,
    naming `size`, before anything is loaded or fitted (the node has no check of its own)."""
    cls = pack.NODE_CLASS_MAPPINGS["NextStepEdit"]
    defaults = {k: v for k, v in widget_defaults(cls).items() if v is not None}
    assert validate_widgets(cls, {**defaults, "size": 8}) == [("size", "Value 8 smaller than min of 16")]
    assert validate_widgets(cls, {**defaults, "size": 1000}) == []
    parts = load_parts(pack, "NextStep-1-Large-Edit")
    loads = len(host.load_calls)
    with pytest.raises(pack.nextstep_core.errors.SettingsError, match=r"^size=1000 is not a multiple of 16.*"
                       r"use 992 or 1008"):
        call(cls, **node_args(pack, "NextStepEdit", parts, size=1000))
    assert len(host.load_calls) == loads
    # fit none ignores size: the input's own sides are what must fit
    with pytest.raises(pack.nextstep_core.errors.SettingsError, match="The input image is 30x32"):
        call(cls, **node_args(pack, "NextStepEdit", parts, size=1000, fit="none", image=torch.rand(1, 32, 30, 3)))
    assert validate_widgets(cls, {**defaults, "size": 512, "cfg_img": float("inf")}) == [
        ("cfg_img", "Value inf bigger than max of 30.0")]


def test_server_timeout_refuses_nan_and_infinities(pack):
    """The server node's timeout is an INT (ComfyUI's own conversion refuses NaN there, on that
    input); the engine's Server, which the CLI's --server-timeout reaches, refuses them itself."""
    Server = pack.nextstep_core.remote.servers.Server
    ServerError = pack.nextstep_core.remote.servers.ServerError
    for bad in (float("nan"), float("inf"), 0, -5):
        with pytest.raises(ServerError, match=rf"^Server timeout {bad} s must be a positive finite number"):
            Server("http://127.0.0.1:9", bad)
    cls = pack.NODE_CLASS_MAPPINGS["NextStepServer"]
    assert cls.INPUT_TYPES()["required"]["timeout"][0] == "INT"
    defaults = {k: v for k, v in widget_defaults(cls).items() if v is not None}
    errors = validate_widgets(cls, {**defaults, "timeout": float("nan")})
    assert [e[0] for e in errors] == ["timeout"] and "Failed to convert" in errors[0][1]


def test_cli_server_timeout_nan_is_refused(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT as root
    proc = subprocess.run([sys.executable, "-m", "nextstep_core", "generate", "--server", "http://127.0.0.1:9",
                           "--server-timeout", "nan", "--prompt", "x", "--out", str(tmp_path / "x.png")],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Server timeout nan s must be a positive finite number" in proc.stderr, proc.stderr
