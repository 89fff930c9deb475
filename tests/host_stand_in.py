"""A stand-in for the few ComfyUI modules the pack calls (folder_paths, comfy.model_management,
comfy.model_patcher, comfy.ops, comfy.model_prefetch, comfy.utils, comfy.cli_args, server), written from
their behaviour in ComfyUI 0.33.

Installed into sys.modules for a test, it lets the nodes run their real ComfyUI code paths
(folder registration, ModelPatcher wrapping, load_models_gpu, progress, previews, Cancel)
without a ComfyUI checkout, and records what the pack asked of the host.
Also loads the pack the way ComfyUI does: as a package named after its folder.
"""
from __future__ import annotations

import enum
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/nextstep-tiny-official-layout"
PACK_NAME = "comfyui_nextstep_under_test"
PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


def load_pack():
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _own_tensors(module: torch.nn.Module) -> list:
    return [t for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)) if t is not None]


def _patchers(host) -> types.ModuleType:
    """comfy.model_patcher: ModelPatcher (partial loads: comfy.ops layers that do not fit are cast per
    call) and ModelPatcherDynamic (every comfy.ops layer paged per call, other modules moved whole,
    paging units read from the model). The stand-in's GPU is the CPU, so moves are bookkeeping."""
    mod = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
            if getattr(self.model, "device", None) is None:
                self.model.device = offload_device
            for attr, value in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0),
                                ("model_lowvram", False), ("current_weight_patches_uuid", None)):
                if not hasattr(self.model, attr):
                    setattr(self.model, attr, value)

        def is_dynamic(self):
            return False

        def model_size(self):
            """Measured once and kept, as core does."""
            if self.size > 0:
                return self.size
            self.size = _bytes(self.model.state_dict().values())
            return self.size

        def loaded_size(self):
            return self.model.model_loaded_weight_memory

        def current_loaded_device(self):
            return self.model.device

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            loaded, lowvram = 0, False
            for m in self.model.modules():
                size = _bytes(_own_tensors(m))
                if not size:
                    continue
                if hasattr(m, "comfy_cast_weights"):
                    fits = extra_memory >= 1e30 or loaded + size <= extra_memory
                    m.comfy_cast_weights = not fits or getattr(type(m), "comfy_cast_weights", False)
                    if not fits:
                        lowvram = True
                        continue
                loaded += size
            self.model.model_lowvram, self.model.model_loaded_weight_memory = lowvram, loaded
            self.model.device = device_to
            return loaded

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            return 0

        def detach(self, unpatch_all=True):
            if unpatch_all:
                self.model.device = self.offload_device
                self.model.model_loaded_weight_memory = 0
            return self.model

    class ModelPatcherDynamic(ModelPatcher):
        def is_dynamic(self):
            return True

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            assert device_to == self.load_device
            get_units = getattr(self.model, "get_dynamic_vram__units", None)
            host.units[id(self)] = get_units() if get_units is not None else ([], [])
            forced = 0
            for m in self.model.modules():
                if hasattr(m, "comfy_cast_weights"):
                    m.comfy_cast_weights = True  # paged in when it runs
                else:
                    forced += _bytes(_own_tensors(m))
            self.model.model_loaded_weight_memory = forced
            self.model.device = device_to
            return None

    mod.ModelPatcher, mod.ModelPatcherDynamic = ModelPatcher, ModelPatcherDynamic
    mod.CoreModelPatcher = ModelPatcherDynamic if host.dynamic else ModelPatcher
    return mod


def _ops(host) -> types.ModuleType:
    """comfy.ops: layer classes that cast their weights to the input's device and dtype per call when
    core says so (`comfy_cast_weights`), and pick_operations."""
    import torch.nn.functional as F
    mod = types.ModuleType("comfy.ops")

    def cast(layer, x):
        host.casts += 1
        w = layer.weight.to(device=x.device, dtype=x.dtype)
        b = None if layer.bias is None else layer.bias.to(device=x.device, dtype=x.dtype)
        return w, b

    class CastWeightBiasOp:
        comfy_cast_weights = False

        def reset_parameters(self):
            return None

    def make(cast_by_default: bool):
        class Ops:
            class Linear(CastWeightBiasOp, torch.nn.Linear):
                comfy_cast_weights = cast_by_default

                def forward(self, x):
                    return F.linear(x, *cast(self, x)) if self.comfy_cast_weights else super().forward(x)

            class Conv2d(CastWeightBiasOp, torch.nn.Conv2d):
                comfy_cast_weights = cast_by_default

                def forward(self, x):
                    return self._conv_forward(x, *cast(self, x)) if self.comfy_cast_weights else super().forward(x)

            class GroupNorm(CastWeightBiasOp, torch.nn.GroupNorm):
                comfy_cast_weights = cast_by_default

                def forward(self, x):
                    if not self.comfy_cast_weights:
                        return super().forward(x)
                    return F.group_norm(x, self.num_groups, *cast(self, x), self.eps)

            class Embedding(CastWeightBiasOp, torch.nn.Embedding):
                comfy_cast_weights = cast_by_default

                def forward(self, ids):
                    if not self.comfy_cast_weights:
                        return super().forward(ids)
                    host.casts += 1
                    return F.embedding(ids, self.weight.to(ids.device))
        return Ops

    mod.disable_weight_init, mod.manual_cast = make(False), make(True)

    def mixed_precision_ops(quant_config={}, compute_dtype=torch.bfloat16, full_precision_mm=False, disabled=()):
        """Linear layers that take a `comfy_quant` entry from the state dict (as core's do): the
        weight stays quantized (`host.quantized` counts them) and is dequantized per call."""
        import json

        class MixedPrecisionOps(mod.manual_cast):
            class Linear(torch.nn.Module, CastWeightBiasOp):
                def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                    super().__init__()
                    self.in_features, self.out_features = in_features, out_features
                    self.quant_format = None
                    self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=compute_dtype)) if bias else None

                def _load_from_state_dict(self, state, prefix, local_metadata, strict, missing, unexpected, errors):
                    weight = state.pop(prefix + "weight")
                    conf = state.pop(prefix + "comfy_quant", None)
                    if conf is None:
                        self.weight = torch.nn.Parameter(weight.to(compute_dtype), requires_grad=False)
                    else:
                        self.quant_format = json.loads(conf.numpy().tobytes())["format"]
                        self.weight = torch.nn.Parameter(weight, requires_grad=False)
                        self.weight_scale = state.pop(prefix + "weight_scale")
                        host.quantized += 1
                    super()._load_from_state_dict(state, prefix, local_metadata, strict, missing, unexpected, errors)
                    for key in (prefix + "weight", prefix + "weight_scale", prefix + "comfy_quant"):
                        if key in missing:
                            missing.remove(key)

                def forward(self, x):
                    w = self.weight
                    if self.comfy_cast_weights:
                        host.casts += 1
                    if type(w.data).__name__ == "QuantizedTensor":  # a registered layout (the pack's int4) computes
                        return F.linear(x, w.data, None if self.bias is None else self.bias.to(x.dtype))
                    if self.quant_format is not None:
                        scale = self.weight_scale.to(torch.float32)
                        w = w.to(torch.float32) * (scale.reshape(-1, 1) if scale.numel() > 1 else scale)
                    b = None if self.bias is None else self.bias.to(x.dtype)
                    return F.linear(x, w.to(device=x.device, dtype=x.dtype), b)

        return MixedPrecisionOps

    def pick_operations(weight_dtype, compute_dtype, load_device=None, disable_fast_fp8=False,
                        fp8_optimizations=False, model_config=None):
        if model_config is not None and getattr(model_config, "quant_config", None):
            return mixed_precision_ops(model_config.quant_config, compute_dtype)
        return mod.disable_weight_init if compute_dtype is None or weight_dtype == compute_dtype else mod.manual_cast

    mod.mixed_precision_ops = mixed_precision_ops

    mod.pick_operations = pick_operations
    return mod


def _quant_ops() -> types.ModuleType:
    """comfy.quant_ops: the layout registry is comfy-kitchen's (as in core); without the package core
    has no layouts at all."""
    mod = types.ModuleType("comfy.quant_ops")
    mod.QUANT_ALGOS = {}
    try:
        from comfy_kitchen.tensor import register_layout_class
    except ImportError:
        mod._CK_AVAILABLE = False
        return mod
    mod._CK_AVAILABLE, mod.register_layout_class = True, register_layout_class
    return mod


def _prefetch(host) -> types.ModuleType:
    """comfy.model_prefetch: a queue only under dynamic VRAM; each pop fetches the module whose turn
    it is (recorded), then runs its body."""
    mod = types.ModuleType("comfy.model_prefetch")

    def make_prefetch_queue(queue, device, transformer_options):
        if not transformer_options.get("prefetch_dynamic_vbars", False):
            return None
        return [None] + list(queue) + [None]

    def prefetch_queue_pop(queue, device, module, dtype=None, core=None, enable_graph=False, generator=None):
        if queue is None:
            if core is not None:
                core()
            return
        queue.pop(0)
        if queue[0] is not None:
            assert queue[0] is module, "the queue runs the modules in the order it was given"
            host.prefetched.append(queue[0])
        if core is not None:
            core()

    mod.make_prefetch_queue, mod.prefetch_queue_pop = make_prefetch_queue, prefetch_queue_pop
    return mod


class Interrupted(BaseException):
    """Like ComfyUI's InterruptProcessingException (a BaseException since 0.3.6x)."""


class Host:
    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self.load_calls = []      # (patchers, memory_required, force_full_load)
        self.progress = []        # (value, total, preview, node_id)
        self.on_progress = None   # called with (value, total) after each progress update
        self.interrupted = False
        self.free_calls = []      # (bytes, device, keep_loaded, for_dynamic, pins_required) asked of free_memory
        self.unloaded = []        # patchers free_memory unloaded whole
        self.pins_reserved = 0    # pinned RAM reserved for non-dynamic models
        self.dynamic = True       # CoreModelPatcher is ModelPatcherDynamic (dynamic VRAM on)
        self.casts = 0            # weights comfy.ops layers cast per call
        self.quantized = 0        # layers mixed-precision ops loaded quantized
        self.prefetched = []      # modules core's prefetch queue fetched, in order
        self.units = {}           # id(patcher) -> what get_dynamic_vram__units() gave
        self.loaded = []          # patchers load_models_gpu loaded, most recent first
        self.seen = []            # every patcher ever asked to load (what holds device memory)
        self.free_bytes = 1 << 40  # what get_free_memory reports
        self.reserved_bytes = 400 << 20  # ComfyUI's default reserve (--reserve-vram changes it)
        self.texts = []           # (text, node_id) shown on nodes
        self.modules = self._build()

    def _build(self) -> dict:
        host = self
        fp = types.ModuleType("folder_paths")
        fp.models_dir = str(self.models_dir)
        fp.supported_pt_extensions = set(PT_EXTENSIONS)
        fp.folder_names_and_paths = {"vae": ([str(self.models_dir / "vae")], set(PT_EXTENSIONS))}

        def add_model_folder_path(name, path, is_default=False):
            if name in fp.folder_names_and_paths:
                paths = fp.folder_names_and_paths[name][0]
                if path in paths:
                    if is_default and paths[0] != path:
                        paths.remove(path)
                        paths.insert(0, path)
                elif is_default:
                    paths.insert(0, path)
                else:
                    paths.append(path)
            else:
                fp.folder_names_and_paths[name] = ([path], set())

        def get_folder_paths(name):
            return list(fp.folder_names_and_paths[name][0])

        def get_filename_list(name):
            paths, exts = fp.folder_names_and_paths[name]
            out = []
            for base in paths:
                for dirpath, _dirs, files in os.walk(base):
                    for f in files:
                        if not exts or os.path.splitext(f)[1].lower() in exts:
                            out.append(os.path.relpath(os.path.join(dirpath, f), base).replace(os.sep, "/"))
            return sorted(set(out))

        def get_full_path(name, filename):
            for base in fp.folder_names_and_paths[name][0]:
                path = os.path.join(base, filename)
                if os.path.isfile(path):
                    return path
            return None

        fp.add_model_folder_path, fp.get_folder_paths = add_model_folder_path, get_folder_paths
        fp.get_filename_list, fp.get_full_path = get_filename_list, get_full_path

        mm = types.ModuleType("comfy.model_management")
        mm.InterruptProcessingException = Interrupted
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.unet_offload_device = lambda: torch.device("cpu")

        def device_free(device):
            """Free memory as the card would report it: what was free with none of the pack's parts
            placed, less what they hold now, listed or not (the stand-in computes on the CPU, so it counts)."""
            return host.free_bytes - sum(p.loaded_size() for p in host.seen if p.load_device == device)

        def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                            force_full_load=False):
            """ComfyUI 0.33's order: a request holding any non-dynamic model frees memory with
            for_dynamic=False (other dynamic models are unloaded instead of paged) and reserves pinned
            RAM for the non-dynamic models' whole size; then each model loads with the lowvram room left."""
            host.load_calls.append((list(models), memory_required, force_full_load))
            host.seen.extend(m for m in models if not any(m is p for p in host.seen))
            inference = mm.minimum_inference_memory()
            extra = max(inference, memory_required + host.reserved_bytes)
            minimum = extra if minimum_memory_required is None else max(
                inference, minimum_memory_required + host.reserved_bytes)
            order = list(reversed(list(dict.fromkeys(models))))
            for_dynamic = all(m.is_dynamic() for m in order)
            for m in order:  # ComfyUI drops its record of a model it loads again, keeping the weights
                for p in [p for p in host.loaded if p.model is m.model]:
                    p.detach(unpatch_all=False)
                    host.loaded.remove(p)
            needed, pins = {}, {}
            for m in order:
                needed[m.load_device] = needed.get(m.load_device, 0) + m.model_size() - m.loaded_size()
                if not m.is_dynamic():
                    pins[m.load_device] = pins.get(m.load_device, 0) + m.model_size()
            for dev, n in needed.items():
                free_memory(n * 1.1 + extra, dev, for_dynamic=for_dynamic, pins_required=pins.get(dev, 0))
                if device_free(dev) < minimum:
                    free_memory(minimum, dev, for_dynamic=for_dynamic)
            for m in order:
                state = mm.vram_state
                room = 0
                if state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NORMAL_VRAM) and not force_full_load:
                    loaded = m.loaded_size()
                    free = device_free(m.load_device) + loaded
                    room = max(0, free - minimum, min(free * 0.4, free - inference)) - loaded
                    room = room or 0.1
                if state == mm.VRAMState.NO_VRAM:
                    room = 0.1
                m.partially_load(m.load_device, room or 1e32)
                if not any(p is m for p in host.loaded):
                    host.loaded.insert(0, m)

        def throw_exception_if_processing_interrupted():
            if host.interrupted:
                host.interrupted = False
                raise Interrupted()

        mm.VRAMState = enum.Enum("VRAMState", "DISABLED NO_VRAM LOW_VRAM NORMAL_VRAM HIGH_VRAM SHARED", start=0)
        mm.vram_state = mm.VRAMState.NORMAL_VRAM  # tests set NO_VRAM / LOW_VRAM as the flags would

        def free_memory(memory_required, device, keep_loaded=[], for_dynamic=True, pins_required=0, **kw):
            """Unloads models not kept, the least recently loaded first, while the room is short. With
            for_dynamic=False (a non-dynamic model in the request) a dynamic model is unloaded whole
            instead of giving back pages, and the pin budget is taken for `pins_required`."""
            host.free_calls.append((memory_required, device, list(keep_loaded), for_dynamic, pins_required))
            host.pins_reserved += pins_required
            for p in reversed(list(host.loaded)):
                if any(p is k for k in keep_loaded) or p.load_device != device:
                    continue
                if p.is_dynamic() and not for_dynamic:
                    host.unloaded.append(p)
                    p.detach()
                    host.loaded.remove(p)
                    continue
                short = memory_required - device_free(device)
                if short <= 0:
                    continue
                if short < p.loaded_size() and p.partially_unload(p.offload_device, short) >= short:
                    continue
                host.unloaded.append(p)
                p.detach()
                host.loaded.remove(p)

        def unload_all_models():
            """What --disable-smart-memory does after every prompt."""
            free_memory(1e30, mm.get_torch_device())

        mm.unload_all_models = unload_all_models
        mm.minimum_inference_memory = lambda: (1 << 30) * 0.8 + host.reserved_bytes
        mm.free_memory = free_memory
        mm.get_free_memory = lambda dev=None, torch_free_too=False: device_free(torch.device(dev or "cpu"))
        mm.extra_reserved_memory = lambda: host.reserved_bytes
        mm.loaded_models = lambda only_currently_used=False: list(host.loaded)
        mm.load_models_gpu = load_models_gpu
        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
        mm.processing_interrupted = lambda: host.interrupted

        patcher, ops, prefetch = _patchers(host), _ops(host), _prefetch(host)

        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.node_id, self.current = total, node_id, 0

            def update_absolute(self, value, total=None, preview=None):
                if total is not None:
                    self.total = total
                self.current = min(value, self.total)
                host.progress.append((self.current, self.total, preview, self.node_id))
                if host.on_progress is not None:
                    host.on_progress(self.current, self.total)

        utils.ProgressBar = ProgressBar

        cli_args = types.ModuleType("comfy.cli_args")
        cli_args.args = types.SimpleNamespace(preview_size=512)

        server = types.ModuleType("server")

        class PromptServer:
            instance = None

            def send_progress_text(self, text, node_id, sid=None):
                host.texts.append((text, node_id))

        PromptServer.instance = PromptServer()
        server.PromptServer = PromptServer

        comfy = types.ModuleType("comfy")
        comfy.__path__ = []
        comfy.model_management, comfy.model_patcher, comfy.utils, comfy.cli_args = mm, patcher, utils, cli_args
        comfy.ops, comfy.model_prefetch, comfy.quant_ops = ops, prefetch, _quant_ops()
        return {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm, "comfy.model_patcher": patcher,
                "comfy.ops": ops, "comfy.model_prefetch": prefetch, "comfy.quant_ops": comfy.quant_ops,
                "comfy.utils": utils, "comfy.cli_args": cli_args, "server": server}

    def use_dynamic(self, on: bool) -> "Host":
        """Dynamic VRAM on (the default on NVIDIA/AMD) or off (--disable-dynamic-vram, --novram, CPU)."""
        self.dynamic = on
        mp = self.modules["comfy.model_patcher"]
        mp.CoreModelPatcher = mp.ModelPatcherDynamic if on else mp.ModelPatcher
        return self

    def install(self, monkeypatch) -> "Host":
        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        return self

    @property
    def folder_paths(self):
        return self.modules["folder_paths"]

    def previews(self):
        return [p for _v, _t, p, _n in self.progress if p is not None]


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, pack):
    """models/ with nextstep/NextStep-1-Large and nextstep/NextStep-1-Large-Edit (tiny, random) and a
    single-file VAE in vae/, named as the example workflows name them."""
    from safetensors.torch import save_file
    write_tiny = importlib.import_module(f"{PACK_NAME}.nextstep_core.tiny").write_tiny
    base = tmp_path_factory.mktemp("comfy") / "models"
    write_tiny(str(base / "nextstep" / "NextStep-1-Large"))
    write_tiny(str(base / "nextstep" / "NextStep-1-Large-Edit"), edit=True, seed=1)
    (base / "vae").mkdir(parents=True)
    vae = torch.load(base / "nextstep" / "NextStep-1-Large" / "vae" / "checkpoint.pt", weights_only=True)
    cfg = (base / "nextstep" / "NextStep-1-Large" / "vae" / "config.json").read_text()
    save_file({k: v.contiguous() for k, v in vae.items()}, str(base / "vae" / "nextstep_vae.safetensors"),
              metadata={"nextstep_vae_config": cfg})
    return base


@pytest.fixture
def host(monkeypatch, models_dir, pack):
    h = Host(models_dir).install(monkeypatch)
    pack.nodes.bridge.register_model_folder()
    return h
