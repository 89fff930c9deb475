"""Inside ComfyUI the parts are core's own models: built from comfy.ops layers, held by core's
patcher class unchanged, loaded in one request that tells core what a run needs. Under dynamic VRAM
that request must stay dynamic, or core unloads the user's other models to make room.

The host stand-in behaves like ComfyUI 0.33 with dynamic VRAM on (ModelPatcherDynamic, paging every
comfy.ops layer per call, the prefetch queue) and off (ModelPatcher's partial loads)."""
import inspect

import pytest
import torch

from host_stand_in import Host, host, models_dir, pack  # noqa: F401
from test_nodes import call, load_parts, result_of, t2i_args


def run_t2i(pack, parts, seed=0, **over):
    out = call(pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"],
               **t2i_args(pack, parts, width=32, height=32, unique_id="7", seed=seed, **over))
    return result_of(out)[0]


def other_model(host, size=1 << 20):
    """Another pack's model (a Flux, say) that core loaded before ours, held by core's patcher."""
    mp = host.modules["comfy.model_patcher"]
    holder = torch.nn.Linear(512, size // (4 * 512), bias=False)
    patcher = mp.CoreModelPatcher(holder, torch.device("cpu"), torch.device("cpu"))
    host.modules["comfy.model_management"].load_models_gpu([patcher])
    return patcher


@pytest.mark.parametrize("dynamic", [True, False])
def test_parts_are_held_by_cores_patcher_unchanged(pack, host, dynamic):
    host.use_dynamic(dynamic)
    mp = host.modules["comfy.model_patcher"]
    for part in load_parts(pack):
        assert type(part.patcher) is mp.CoreModelPatcher  # no subclass, no method of it replaced
        assert not any(k in vars(part.patcher) for k, v in vars(mp.ModelPatcher).items() if callable(v))
    assert not [m for m in pack.nodes.__dict__.values() if inspect.ismodule(m) and any(
        inspect.isclass(c) and issubclass(c, mp.ModelPatcher) for c in vars(m).values())]


def test_every_layer_with_weights_is_a_comfy_ops_layer(pack, host):
    ops = host.modules["comfy.ops"]
    comfy_classes = tuple(c for kind in (ops.disable_weight_init, ops.manual_cast) for c in vars(kind).values()
                          if inspect.isclass(c))
    bb, head, vae = load_parts(pack)
    for part in (bb, head, vae):
        kinds = {type(m) for m in part.module.modules() if isinstance(
            m, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d, torch.nn.GroupNorm))}
        assert kinds and all(issubclass(k, comfy_classes) for k in kinds), kinds
    matrices = [m for layer in bb.module.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert len(matrices) == 7 * len(bb.module.layers)


def test_a_run_under_dynamic_vram_keeps_other_models_loaded(pack, host):
    flux = other_model(host)
    parts = load_parts(pack)
    run_t2i(pack, parts)
    mm = host.modules["comfy.model_management"]
    assert flux in mm.loaded_models() and flux not in host.unloaded
    assert host.pins_reserved == 0
    assert all(for_dynamic for *_, for_dynamic, _pins in host.free_calls)


def test_the_stand_in_unloads_other_models_for_a_non_dynamic_request(pack, host):
    """The check above can fail: a part held by a non-dynamic patcher (what the pack did before) makes
    core unload the other model and reserve pinned RAM for the part's whole size."""
    flux = other_model(host)
    parts = load_parts(pack)
    mp = host.modules["comfy.model_patcher"]
    parts[0].patcher = mp.ModelPatcher(parts[0].patcher.model, torch.device("cpu"), torch.device("cpu"))
    run_t2i(pack, parts)
    assert flux in host.unloaded and host.pins_reserved >= parts[0].patcher.model_size()


def test_the_request_says_what_the_run_needs(pack, host):
    parts = load_parts(pack)
    run_t2i(pack, parts)
    patchers, need, _full = host.load_calls[-1]
    assert patchers == [p.patcher for p in parts]
    bb, vae = parts[0].module, parts[2].module
    engine = pack.nextstep_core.pipeline
    kv_only = bb.cache_bytes(2, engine.PROMPT_TOKENS + 4)
    shape = engine.RunShape(32, 32, (2, 2), batch=1, cfg_rows=2, context=engine.PROMPT_TOKENS)
    assert need == pack.nextstep_core.memory.run_bytes(bb, vae, shape) > kv_only
    run_t2i(pack, parts, batch_size=3)
    assert host.load_calls[-1][1] > need  # three images' rows


def test_dynamic_vram_pages_layers_as_units_through_the_prefetch_queue(pack, host):
    parts = load_parts(pack)
    paged = run_t2i(pack, parts, seed=3)
    bb = parts[0].module
    assert host.units[id(parts[0].patcher)] == (list(bb.layers), [])
    assert host.units[id(parts[1].patcher)] == ([parts[1].module], [])
    assert host.units[id(parts[2].patcher)] == ([parts[2].module], [])
    layers = list(bb.layers)
    assert host.prefetched and len(host.prefetched) % len(layers) == 0
    assert host.prefetched == layers * (len(host.prefetched) // len(layers))  # every backbone call, in order
    assert host.casts > 0 and bb.paged  # weights came in per call; no whole-step capture over them
    # the same node with every weight on the device (core's whole load): the same image
    host.use_dynamic(False)
    whole = load_parts(pack)
    host.prefetched.clear()
    assert torch.equal(run_t2i(pack, whole, seed=3), paged)
    assert not host.prefetched and not whole[0].module.paged and whole[0].module.layer_runner is None


def test_a_partial_load_casts_the_rest_per_call_and_gives_the_same_image(pack, host):
    host.use_dynamic(False)
    parts = load_parts(pack)
    reference = run_t2i(pack, parts, seed=4)
    assert not parts[0].module.paged
    mm = host.modules["comfy.model_management"]
    mm.unload_all_models()
    host.free_bytes = int(mm.minimum_inference_memory()) + parts[0].patcher.model_size() // 2  # half a backbone
    host.casts = 0
    assert torch.equal(run_t2i(pack, parts, seed=4), reference)
    assert parts[0].patcher.model.model_lowvram and parts[0].module.paged and host.casts > 0


def test_self_cot_head_is_a_comfy_layer_and_counted(pack, host):
    parts = load_parts(pack)
    before = parts[0].patcher.model_size()
    run_t2i(pack, parts, self_cot=True)
    head = parts[0].module.lm_head
    assert isinstance(head, host.modules["comfy.ops"].disable_weight_init.Linear)
    assert parts[0].patcher.model_size() == before + head.weight.numel() * head.weight.element_size()


def test_parts_compute_on_the_load_device_wherever_their_weights_are(pack, host):
    bb, head, vae = load_parts(pack)
    for part in (bb, head, vae):
        assert part.module.run_device == part.load_device == part.module.device


def test_comfyui_logs_readable_names(pack, host):
    parts = load_parts(pack)
    assert [type(p.patcher.model).__name__ for p in parts] == ["NextStepBackbone", "NextStepFlowHead", "NextStepVAE"]
    run_t2i(pack, parts)
    assert any("backbone dynamic VRAM" in t and n == "7" for t, n in host.texts)
