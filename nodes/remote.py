"""NextStep Server: the three model sockets of a text-to-image graph, served by vLLM-Omni.

The node stands where the three loaders stand and plugs into the same NextStep Text to Image
node, so a graph switches from local to remote by changing where the model comes from, keeping
its prompt, size, cfg, steps and seed widgets. The API key comes from an environment variable,
never from a widget, because widget values are saved into every shared workflow; for the same
reason the servers a workflow names get that key only when the user's environment trusts them.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import bridge, settings
from .sockets import BACKBONE, FLOW_HEAD, VAE, label
from ..nextstep_core.api import (API_KEY_ENV, DEFAULT_TIMEOUT, HOSTS_ENV, START_HINT, Server, SettingsError, draw,
                                 parse_servers)


@dataclass(eq=False)
class RemoteModel:
    kind: str               # the socket it travels through: BACKBONE, FLOW_HEAD or VAE
    servers: tuple          # base URLs
    model: str              # the served model name to check against ('' = any NextStep-1.1)
    timeout: float
    variant: str = "nextstep1.1"   # what vLLM-Omni serves: sampler "auto" resolves to its own

    def __repr__(self) -> str:
        return f"<NextStep {label(self.kind)} on vLLM-Omni {', '.join(self.servers)}>"


def is_remote(*parts) -> bool:
    return any(isinstance(p, RemoteModel) for p in parts)


LOCAL_ONLY = ("A NextStep Server draws NextStep-1.1 text to image only (that is what vLLM-Omni serves); edits and "
              "storyboards run locally: connect the three NextStep loaders.")


class NextStepServer:
    DESCRIPTION = ("Draws with NextStep-1.1 on vLLM-Omni servers instead of this machine: connect its three outputs "
                   "to NextStep Text to Image in place of the three loaders. Several servers share the images of a "
                   "run (one request per image, seed + image index), so the images do not depend on how many there "
                   f"are. An API key (vLLM's --api-key) is read from the {API_KEY_ENV} environment variable and sent "
                   f"only to the servers listed in {HOSTS_ENV} (host:port, comma-separated; plain http only to "
                   "this machine or to an entry written as http://host:port); a workflow naming any other server "
                   "stops before anything is sent.")
    CATEGORY = settings.CATEGORY
    FUNCTION = "connect"
    RETURN_TYPES = (BACKBONE, FLOW_HEAD, VAE)
    RETURN_NAMES = ("backbone", "flow_head", "vae")
    OUTPUT_TOOLTIPS = ("To NextStep Text to Image's backbone input.", "To its flow_head input.", "To its vae input.")
    SEARCH_ALIASES = ["nextstep", "vllm", "vllm-omni", "server", "remote", "multi gpu"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "servers": ("STRING", {"default": "http://127.0.0.1:8091", "multiline": True, "tooltip": (
                "Base URLs of vLLM-Omni servers, one per line. Start one with: " + START_HINT + " (add "
                "--cfg-parallel-size 2 for two GPUs). The images of a run are spread over all of them. With "
                f"{API_KEY_ENV} set, each must be listed in the environment variable {HOSTS_ENV} (e.g. "
                f"{HOSTS_ENV}=gpu-box:8091,127.0.0.1:8091; http://gpu-box:8091 to allow plain http to another "
                "machine), so a shared workflow cannot send your key elsewhere.")}),
            "model": ("STRING", {"default": "", "tooltip": (
                "The served model name to check against (vLLM's --served-model-name). Empty: any NextStep-1.1.")}),
            "timeout": ("INT", {"default": int(DEFAULT_TIMEOUT), "min": 10, "max": 86400, "step": 10, "tooltip": (
                "Seconds one image may take on a server. A 512x512 image takes minutes on small GPUs.")}),
        }}

    def connect(self, servers, model, timeout):
        urls = tuple(parse_servers(servers))
        Server(urls[0], timeout)  # checks the timeout
        return tuple(RemoteModel(kind, urls, model.strip(), float(timeout)) for kind in (BACKBONE, FLOW_HEAD, VAE))


def check_remote(backbone, flow_head, vae) -> RemoteModel:
    parts = (backbone, flow_head, vae)
    for value, kind in zip(parts, (BACKBONE, FLOW_HEAD, VAE)):
        if not isinstance(value, RemoteModel) or value.kind != kind:
            raise SettingsError(f"The {label(kind)} input got {value!r}, but another input comes from a NextStep "
                                "Server: connect all three inputs to one NextStep Server node, or all three to the "
                                "NextStep loaders.")
    if len({(p.servers, p.model, p.timeout) for p in parts}) > 1:
        raise SettingsError("The three inputs come from different NextStep Server nodes; connect all three to one.")
    return backbone


def text_to_image(backbone, flow_head, vae, request, node_id=None):
    """-> IMAGE [B, H, W, 3]. Shows images done (per server) and the elapsed time while waiting."""
    remote = check_remote(backbone, flow_head, vae)
    bar = bridge.progress_bar(len(request.prompts) * request.images_per_prompt, node_id)

    def progress(p):
        if bar is not None:
            bar.update_absolute(sum(p.done), sum(p.total))
        bridge.progress_text(p.describe(), node_id)

    result = draw(list(remote.servers), request, model=remote.model or None, timeout=remote.timeout,
                  on_progress=progress, check=bridge.interrupt_check())
    return result.images
