"""ComfyUI nodes for NextStep: the V1 class declarations and their registry.

Node ids are stable (saved workflows refer to them); display names are for people.
"""
from .edit import NextStepEdit
from .generate import NextStepTextToImage
from .loaders import NextStepBackboneLoader, NextStepFlowHeadLoader, NextStepVAELoader
from .remote import NextStepServer
from .storyboard import NextStepStoryboard, NextStepStoryboardPanel, NextStepStoryStart

NODE_CLASS_MAPPINGS = {
    "NextStepBackboneLoader": NextStepBackboneLoader,
    "NextStepFlowHeadLoader": NextStepFlowHeadLoader,
    "NextStepVAELoader": NextStepVAELoader,
    "NextStepTextToImage": NextStepTextToImage,
    "NextStepEdit": NextStepEdit,
    "NextStepStoryboard": NextStepStoryboard,
    "NextStepStoryStart": NextStepStoryStart,
    "NextStepStoryboardPanel": NextStepStoryboardPanel,
    "NextStepServer": NextStepServer,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "NextStepBackboneLoader": "NextStep Backbone Loader",
    "NextStepFlowHeadLoader": "NextStep Flow Head Loader",
    "NextStepVAELoader": "NextStep VAE Loader",
    "NextStepTextToImage": "NextStep Text to Image",
    "NextStepEdit": "NextStep Edit",
    "NextStepStoryboard": "NextStep Storyboard",
    "NextStepStoryStart": "NextStep Story Start",
    "NextStepStoryboardPanel": "NextStep Storyboard Panel",
    "NextStepServer": "NextStep Server (vLLM-Omni)",
}
