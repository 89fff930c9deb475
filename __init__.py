"""ComfyUI-NextStep: StepFun's NextStep-1 image models as ComfyUI nodes.

ComfyUI imports this folder as a package; the engine (`nextstep_core`) never imports ComfyUI,
and `nodes/bridge.py` is the one module that does, lazily.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.bridge import register_model_folder

WEB_DIRECTORY = "./web"

register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
