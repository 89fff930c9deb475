"""The node classes called the way ComfyUI calls them: INPUT_TYPES, VALIDATE_INPUTS, FUNCTION
with keyword arguments, outputs checked against RETURN_TYPES; end to end on tiny checkpoints in
a temporary models folder, with and without (a stand-in for) the ComfyUI host."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from host_stand_in import OFFICIAL_FIXTURE, ROOT, Host, Interrupted, host, models_dir, pack  # noqa: F401

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
T2I_WIDGETS = ["prompt", "positive_prompt", "negative_prompt", "width", "height", "cfg", "steps", "timesteps_shift",
               "use_norm", "sampler", "cfg_schedule", "self_cot", "seed", "batch_size"]
EDIT_WIDGETS = ["instruction", "positive_prompt", "negative_prompt", "fit", "size", "cfg", "cfg_img", "steps",
                "timesteps_shift", "use_norm", "sampler", "cfg_schedule", "seed"]
DISPLAY = {"NextStepTextToImage": "NextStep Text to Image", "NextStepEdit": "NextStep Edit",
           "NextStepVAELoader": "NextStep VAE Loader", "NextStepBackboneLoader": "NextStep Backbone Loader",
           "NextStepFlowHeadLoader": "NextStep Flow Head Loader", "NextStepStoryboard": "NextStep Storyboard",
           "NextStepStoryStart": "NextStep Story Start", "NextStepStoryboardPanel": "NextStep Storyboard Panel"}
FAST = dict(steps=2)


def is_widget(spec) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def widget_names(cls) -> list:
    it = cls.INPUT_TYPES()
    return [n for sect in ("required", "optional") for n, s in it.get(sect, {}).items() if is_widget(s)]


def call(cls, **kwargs):
    """As ComfyUI does: a fresh instance, the FUNCTION by name, keyword arguments."""
    return getattr(cls(), cls.FUNCTION)(**kwargs)


def result_of(out):
    return out["result"] if isinstance(out, dict) else out


def load_parts(pack, model="NextStep-1-Large", vae_name=None, dtype="auto", device="auto"):
    m = pack.NODE_CLASS_MAPPINGS
    bb = result_of(call(m["NextStepBackboneLoader"], model_name=model, dtype=dtype, device=device))[0]
    head = result_of(call(m["NextStepFlowHeadLoader"], model_name=model, dtype=dtype, device=device))[0]
    vae = result_of(call(m["NextStepVAELoader"], vae_name=vae_name or f"{model}/vae", dtype=dtype, device=device))[0]
    return bb, head, vae


def widget_defaults(cls) -> dict:
    spec = {n: s for n, s in cls.INPUT_TYPES()["required"].items() if is_widget(s)}
    return {n: s[1].get("default", s[0][0] if isinstance(s[0], list) else None) for n, s in spec.items()}


def t2i_args(pack, parts, **over):
    args = widget_defaults(pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"])
    args.update(dict(zip(("backbone", "flow_head", "vae"), parts)), prompt="a red cube", width=64, height=64, **FAST)
    return {**args, **over}


def edit_args(pack, parts, image, **over):
    args = widget_defaults(pack.NODE_CLASS_MAPPINGS["NextStepEdit"])
    args.update(dict(zip(("backbone", "flow_head", "vae"), parts)), image=image, instruction="make it blue",
                size=64, **FAST)
    return {**args, **over}


def check_outputs(cls, out):
    res = result_of(out)
    assert isinstance(res, tuple) and len(res) == len(cls.RETURN_TYPES)
    for value, kind in zip(res, cls.RETURN_TYPES):
        if kind == "IMAGE":
            assert value.dtype == torch.float32 and value.ndim == 4 and value.shape[-1] == 3
            assert value.device.type == "cpu" and 0.0 <= value.min() and value.max() <= 1.0
        elif kind == "STRING":
            assert isinstance(value, str)
    return res


# -- declarations -------------------------------------------------------------------------------

def test_pack_imports_without_comfyui():
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("pack", r"{ROOT / '__init__.py'}",
                                                      submodule_search_locations=[r"{ROOT}"])
        m = importlib.util.module_from_spec(spec); sys.modules["pack"] = m; spec.loader.exec_module(m)
        leaked = [k for k in sys.modules if k == "folder_paths" or k == "comfy" or k.startswith("comfy.")]
        assert not leaked, leaked
        assert m.WEB_DIRECTORY == "./web"
        for cls in m.NODE_CLASS_MAPPINGS.values():
            cls.INPUT_TYPES()
        print(sorted(m.NODE_CLASS_MAPPINGS))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "NextStepTextToImage" in out.stdout


@pytest.mark.parametrize("with_host", [False, True])
def test_declarations_are_well_formed(pack, request, with_host):
    if with_host:
        request.getfixturevalue("host")
    assert set(DISPLAY) <= set(pack.NODE_CLASS_MAPPINGS)
    assert {k: pack.NODE_DISPLAY_NAME_MAPPINGS[k] for k in DISPLAY} == DISPLAY
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    assert all(k.startswith("NextStep") for k in pack.NODE_CLASS_MAPPINGS)
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "NextStep" or cls.CATEGORY.startswith("NextStep/"), node_id
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40, node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
        types_ = cls.INPUT_TYPES()
        assert set(types_) <= {"required", "optional", "hidden"}
        for sect in ("required", "optional"):
            for name, spec in types_.get(sect, {}).items():
                assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (node_id, name)
                kind, opts = spec[0], spec[1]
                assert isinstance(kind, (str, list)), (node_id, name)
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
                if kind in ("INT", "FLOAT"):
                    assert opts["min"] <= opts["default"] <= opts["max"], (node_id, name)
                if isinstance(kind, list) and "default" in opts:
                    assert opts["default"] in kind, (node_id, name)
        validate = getattr(cls, "VALIDATE_INPUTS", None)
        if validate is not None:
            import inspect
            args = inspect.getfullargspec(validate).args[1:]
            assert args and all(a in types_["required"] for a in args), node_id
            # ComfyUI attaches a VALIDATE_INPUTS message to every input the function takes: with one
            # input, each message lands on the input it is about
            assert len(args) == 1, (node_id, args)


def test_widget_names_match_the_web_contract(pack):
    m = pack.NODE_CLASS_MAPPINGS
    assert widget_names(m["NextStepTextToImage"]) == T2I_WIDGETS
    assert widget_names(m["NextStepEdit"]) == EDIT_WIDGETS
    t2i = m["NextStepTextToImage"].INPUT_TYPES()
    assert t2i["optional"]["reasoning"][0] == "STRING" and t2i["optional"]["reasoning"][1]["forceInput"]
    assert m["NextStepTextToImage"].RETURN_NAMES == ("images", "reasoning")
    req = t2i["required"]
    for dim in ("width", "height"):
        assert req[dim] == ("INT", {**req[dim][1], "default": 512, "min": 16, "max": 2048, "step": 16})
    assert req["sampler"][0] == ["auto", "nextstep1", "nextstep1.1", "ode"]
    assert req["cfg_schedule"][0] == ["constant", "linear", "linear-ramp"]
    assert req["seed"][1]["max"] == 2 ** 64 - 1 and req["seed"][1]["control_after_generate"] is True
    edit = m["NextStepEdit"].INPUT_TYPES()["required"]
    assert edit["fit"][0] == ["bucket", "center-crop", "resize", "none"]
    assert (edit["size"][1]["default"], edit["size"][1]["step"]) == (512, 16)
    assert "batch_size" not in edit
    defaults = {k: edit[k][1]["default"] for k in ("cfg", "cfg_img", "timesteps_shift", "use_norm", "negative_prompt")}
    assert defaults == {"cfg": 7.5, "cfg_img": 2.0, "timesteps_shift": 3.2, "use_norm": True,
                        "negative_prompt": "Copy original image."}
    card = {k: req[k][1]["default"] for k in ("cfg", "steps", "timesteps_shift", "use_norm")}
    assert card == {"cfg": 7.5, "steps": 28, "timesteps_shift": 1.0, "use_norm": False}


# -- loaders -----------------------------------------------------------------------------------

def test_dropdowns_list_what_is_installed(pack, host):
    m = pack.NODE_CLASS_MAPPINGS
    models = m["NextStepBackboneLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert models == ["NextStep-1-Large", "NextStep-1-Large-Edit"]
    assert m["NextStepFlowHeadLoader"].INPUT_TYPES()["required"]["model_name"][0] == models
    vaes = m["NextStepVAELoader"].INPUT_TYPES()["required"]["vae_name"][0]
    assert vaes == ["NextStep-1-Large/vae", "NextStep-1-Large-Edit/vae", "vae/nextstep_vae.safetensors"]


def test_model_folder_registration_keeps_extra_model_paths(pack, monkeypatch, models_dir, tmp_path):
    h = Host(tmp_path / "models").install(monkeypatch)
    extra = tmp_path / "elsewhere"
    shutil.copytree(models_dir / "nextstep" / "NextStep-1-Large", extra / "stepfun" / "NextStep-1.1")
    h.folder_paths.add_model_folder_path("nextstep", str(extra))  # what extra_model_paths.yaml does first
    pack.nodes.bridge.register_model_folder()
    assert h.folder_paths.get_folder_paths("nextstep") == [str(tmp_path / "models" / "nextstep"), str(extra)]
    assert pack.nodes.model_folders.model_folders() == {"stepfun/NextStep-1.1": str(extra / "stepfun/NextStep-1.1")}


def test_loaders_wrap_parts_for_the_memory_manager(pack, host):
    bb, head, vae = load_parts(pack)
    assert (bb.kind, head.kind, vae.kind) == ("NEXTSTEP_BACKBONE", "NEXTSTEP_FLOW_HEAD", "NEXTSTEP_VAE")
    assert bb.variant == "nextstep1-large" and bb.tokenizer is not None
    for part in (bb, head, vae):
        assert part.patcher.model.part is part.module
        assert part.patcher.load_device == torch.device("cpu")
    assert "backbone 'NextStep-1-Large'" in repr(bb)
    single = result_of(call(pack.NODE_CLASS_MAPPINGS["NextStepVAELoader"], vae_name="vae/nextstep_vae.safetensors",
                            dtype="fp32", device="cpu"))[0]
    ref = vae.module.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in single.module.state_dict().items())


def test_dtype_choice(pack, host):
    loader = pack.NODE_CLASS_MAPPINGS["NextStepFlowHeadLoader"]
    head = result_of(call(loader, model_name="NextStep-1-Large", dtype="bf16", device="cpu"))[0]
    assert head.module.dtype == torch.bfloat16
    head = result_of(call(loader, model_name="NextStep-1-Large", dtype="auto", device="cpu"))[0]
    assert head.module.dtype == torch.float32


def test_validate_inputs_messages(pack, host):
    m = pack.NODE_CLASS_MAPPINGS
    assert m["NextStepBackboneLoader"].VALIDATE_INPUTS(model_name="NextStep-1-Large") is True
    msg = m["NextStepBackboneLoader"].VALIDATE_INPUTS(model_name="NextStep-1.1")
    assert "'NextStep-1.1' was not found" in msg
    assert "huggingface-cli download stepfun-ai/NextStep-1.1 --local-dir models/nextstep/NextStep-1.1" in msg
    msg = m["NextStepVAELoader"].VALIDATE_INPUTS(vae_name="NextStep-1-Large-Pretrain/vae")
    assert "NextStep-1-Large-Pretrain/vae" in msg and "stepfun-ai/NextStep-1-Large-Pretrain" in msg


def test_loading_a_missing_model_raises_the_same_message(pack, host):
    with pytest.raises(pack.nextstep_core.errors.CheckpointError, match="huggingface-cli download"):
        call(pack.NODE_CLASS_MAPPINGS["NextStepBackboneLoader"], model_name="NextStep-1.1-Pretrain",
             dtype="auto", device="auto")


# -- generation --------------------------------------------------------------------------------

def test_text_to_image_end_to_end(pack, host):
    cls = pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"]
    parts = load_parts(pack)
    out = call(cls, **t2i_args(pack, parts, batch_size=2, seed=7), unique_id="12")
    assert out["ui"] == {"reasoning": [""]}
    images, text = check_outputs(cls, out)
    assert images.shape == (2, 64, 64, 3) and text == ""
    patchers, memory, full = host.load_calls[-1]
    assert patchers == [p.patcher for p in parts] and memory > 0  # one request for the three parts
    assert [v for v, *_ in host.progress] == list(range(1, 17))
    assert {(t, n) for _v, t, _p, n in host.progress} == {(16, "12")}
    kind, image, size = host.previews()[0]
    assert kind == "JPEG" and image.size == (64, 64) and size == 512
    assert host.progress[-1][2] is not None  # the finished picture is the last preview, not a half-grey one
    # the node adds nothing of its own to the engine's image
    core = pack.nextstep_core
    pipe = core.pipeline.NextStepPipeline(parts[0].module, parts[0].tokenizer, parts[1].module, parts[2].module)
    req = core.pipeline.Request(prompts=["a red cube"], width=64, height=64, images_per_prompt=2, seed=7,
                                positive=core.presets.CARD_POSITIVE, negative=core.presets.CARD_NEGATIVE,
                                sampling=core.engine.SamplingSettings(steps=2, sampler="nextstep1"))
    assert torch.equal(pipe.run(req).images, images)


def test_text_to_image_without_comfyui(pack, monkeypatch, models_dir):
    h = Host(models_dir).install(monkeypatch)
    pack.nodes.bridge.register_model_folder()
    parts = load_parts(pack)
    for name in list(h.modules):
        monkeypatch.delitem(sys.modules, name)
    assert not pack.nodes.bridge.in_comfyui()
    for p in parts:
        p.patcher = None
    cls = pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"]
    images, _ = check_outputs(cls, call(cls, **t2i_args(pack, parts, width=32, height=48)))
    assert images.shape == (1, 48, 32, 3)


def test_edit_end_to_end(pack, host):
    cls = pack.NODE_CLASS_MAPPINGS["NextStepEdit"]
    parts = load_parts(pack, "NextStep-1-Large-Edit")
    assert parts[0].variant == "nextstep1-large-edit"
    image = torch.rand(2, 40, 72, 3)  # any size: fitted to a trained bucket
    out = call(cls, **edit_args(pack, parts, image), unique_id="3")
    (images,) = check_outputs(cls, out)
    h, w = pack.nextstep_core.images.nearest_bucket(40, 72, 64)
    assert images.shape == (2, h, w, 3)
    assert out["ui"] == {"fitted": [w, h, 2]}, "the size the editor's cost line shows after the run"
    assert host.progress[-1][:2] == (h // 16 * (w // 16),) * 2
    (images,) = result_of(call(cls, **edit_args(pack, parts, image, fit="center-crop", size=32)))
    assert images.shape == (2, 32, 32, 3)
    with pytest.raises(pack.nextstep_core.errors.SettingsError, match="40x72|72x40"):
        call(cls, **edit_args(pack, parts, image, fit="none"))


def test_cancel_stops_within_one_token_and_models_stay_usable(pack, host):
    cls = pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"]
    parts = load_parts(pack)
    args = t2i_args(pack, parts, seed=5)
    reference = result_of(call(cls, **args))[0]
    host.progress.clear()
    seen = []

    def press_cancel_at_5(value, total):
        seen.append(value)
        if value == 5:
            host.interrupted = True

    host.on_progress = press_cancel_at_5
    with pytest.raises(Interrupted):
        call(cls, **args)
    assert seen[-1] == 5  # token 6 was the last one computed; no progress after the press
    host.on_progress = None
    assert torch.equal(result_of(call(cls, **args))[0], reference)


def test_parts_that_do_not_belong_together(pack, host, tmp_path):
    errors = pack.nextstep_core.errors
    cls = pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"]
    bb, head, vae = load_parts(pack)
    wide = tmp_path / "models" / "wide"
    pack.nextstep_core.tiny.write_tiny(str(wide), hidden=96, heads=4)
    host.folder_paths.add_model_folder_path("nextstep", str(tmp_path / "models"))
    other = result_of(call(pack.NODE_CLASS_MAPPINGS["NextStepFlowHeadLoader"], model_name="wide", dtype="auto",
                           device="auto"))[0]
    with pytest.raises(errors.CheckpointError, match="hidden size is 64"):
        call(cls, **t2i_args(pack, (bb, other, vae)))
    with pytest.raises(errors.SettingsError, match="connect a NextStep Flow Head Loader"):
        call(cls, **t2i_args(pack, (bb, vae, vae)))
    moved = pack.nodes.sockets.LoadedPart(**{**vae.__dict__, "load_device": torch.device("meta")})
    with pytest.raises(errors.SettingsError, match="same device on all three loaders"):
        call(cls, **t2i_args(pack, (bb, head, moved)))


def test_self_cot_toggle_and_supplied_reasoning(pack, host):
    cls = pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"]
    parts = load_parts(pack)
    before = parts[0].patcher.model_size()  # as ComfyUI measures it at load time, before the LM head exists
    assert parts[0].module.lm_head is None
    out = call(cls, **t2i_args(pack, parts, self_cot=True))
    images, text = check_outputs(cls, out)
    assert out["ui"] == {"reasoning": [text]} and images.shape == (1, 64, 64, 3)
    head = parts[0].module.lm_head
    assert head is not None and parts[0].patcher.model_size() == before + head.weight.numel() * head.weight.element_size()
    # a connected reasoning text is used as written, with or without the toggle
    out = call(cls, **t2i_args(pack, parts, reasoning="The cube is red.", self_cot=False))
    assert out["result"][1] == "The cube is red." and out["ui"]["reasoning"] == ["The cube is red."]
    plain = call(cls, **t2i_args(pack, parts, reasoning="   "))
    assert plain["result"][1] == ""
    assert pack.nodes.generate.reasoning_text(["a", "a", "", "b"]) == "a\n\nb"


def test_sampler_auto_follows_the_model(pack):
    resolve = pack.nodes.settings.resolve_sampler
    Part = pack.nodes.sockets.LoadedPart
    for variant, sampler in (("nextstep1-large", "nextstep1"), ("nextstep1.1", "nextstep1.1"),
                             ("nextstep1-large-edit", "nextstep1")):
        part = Part(kind="NEXTSTEP_BACKBONE", module=None, name="x", path="x", load_device=torch.device("cpu"),
                    variant=variant)
        assert resolve("auto", part) == sampler
        assert resolve("ode", part) == "ode"


def test_preview_fills_in_row_by_row(pack, host):
    bb, _head, vae = load_parts(pack)
    tokens = torch.randn(16, 64)
    tokens[5:] = float("nan")  # not sampled yet: must never reach the picture
    image = pack.nextstep_core.preview.partial_image(vae.module, bb.module, tokens, 5, (4, 4))
    import numpy as np
    px = np.asarray(image)
    assert px.shape == (64, 64, 3)
    assert (px[32:] == 128).all()            # rows 3 and 4: nothing yet
    assert (px[16:32, 16:] == 128).all()     # row 2: only its first token exists
    assert not (px[:16] == 128).all()        # row 1 is decoded


def test_official_layout_fixture_through_the_nodes(pack, host, tmp_path):
    if not OFFICIAL_FIXTURE.is_dir():
        pytest.skip(f"{OFFICIAL_FIXTURE} is not beside this checkout (CI puts it at ../shared/fixtures)")
    root = tmp_path / "official"
    shutil.copytree(OFFICIAL_FIXTURE, root / "NextStep-1-Large-official")
    host.folder_paths.add_model_folder_path("nextstep", str(root))
    cls = pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"]
    parts = load_parts(pack, "NextStep-1-Large-official")
    images, _ = check_outputs(cls, call(cls, **t2i_args(pack, parts, width=48, height=32)))
    assert images.shape == (1, 32, 48, 3)
