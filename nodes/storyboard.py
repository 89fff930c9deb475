"""Storyboards: panels that continue one story.

`NextStepStoryboard` makes all panels from one prompt per line. `NextStepStoryStart` +
`NextStepStoryboardPanel` are the same thing as a chain of nodes, so users can branch: a panel
never changes the story it was given (the engine copies the context before extending it), so
two different panel 3s grown from one panel 2 cannot disturb each other. Panel i of the single
node uses seed + i; the chain with seeds seed, seed + 1, ... makes the same images.
Between nodes a story's KV cache waits in CPU RAM, so cached stories do not hold VRAM.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import runner, settings
from .progress import TokenProgress
from ..nextstep_core.api import (EDIT_VARIANT, FALLBACK, STORY_MODES as MODES, SettingsError, StoryContext,
                                 Storyboard, StorySettings, preset)

STORY = "NEXTSTEP_STORY"
CARD = preset(FALLBACK)  # NextStep-1-Large's model card
EDIT_CFG_IMG = preset(EDIT_VARIANT)["cfg_img"]


@dataclass(eq=False)
class StoryState:
    """What travels through a NEXTSTEP_STORY socket: the parts that draw it, and the engine's story."""
    parts: tuple                 # (backbone, flow_head, vae) LoadedParts
    context: StoryContext        # the settings every panel shares, and the story so far

    @property
    def mode(self) -> str:
        return self.context.settings.mode

    @property
    def panels(self) -> int:
        return self.context.panels

    @property
    def last_image(self):
        return self.context.last_image

    def __repr__(self) -> str:
        return f"<NextStep story, {self.panels} panel(s), {self.context.length} tokens, mode {self.mode!r}>"


def story_inputs() -> dict:
    return {
        **settings.model_inputs(),
        "style": settings.prompt_input(
            "Character and style text put before every panel's prompt (e.g. 'A comic about Mia, a girl with a red "
            "scarf. Ink drawing.'). Leave empty for none.", "", multiline=True),
        "positive_prompt": settings.prompt_input("Added after every panel prompt on the guided row.",
                                                 CARD["positive"], multiline=False),
        "negative_prompt": settings.prompt_input(
            "What guidance steers away from. In story mode the unguided row sees the same earlier panels with this "
            "text instead of the new panel's prompt.", CARD["negative"], multiline=False),
        "width": settings.size_input(CARD["width"], "Panel width in pixels, a multiple of 16."),
        "height": settings.size_input(CARD["height"], "Panel height in pixels, a multiple of 16."),
        "cfg": settings.cfg_input(CARD["cfg"], "Guidance scale for every panel (1 = off)."),
        **settings.sampling_inputs(CARD["steps"], CARD["shift"], CARD["use_norm"]),
        "mode": (list(MODES), {"default": "story", "tooltip": (
            "story: every panel continues one sequence, seeing all earlier panels' text and image tokens (fast: "
            "nothing is recomputed). edit chain: each panel is an edit of the one before (load "
            "NextStep-1-Large-Edit; image guidance 2.0).")}),
    }


def start_story(backbone, flow_head, vae, style, positive_prompt, negative_prompt, width, height, cfg, steps,
                timesteps_shift, use_norm, sampler, cfg_schedule, mode) -> StoryState:
    """The story's settings check themselves once, here (see the text-to-image node on why there is
    no VALIDATE_INPUTS); a panel adds only its prompt and seed."""
    cfg_img = EDIT_CFG_IMG if mode == "edit chain" else 1.0
    s = settings.sampling(backbone, cfg=cfg, cfg_img=cfg_img, cfg_schedule=cfg_schedule, steps=steps,
                          timesteps_shift=timesteps_shift, use_norm=use_norm, sampler=sampler)
    story = StorySettings(width, height, s, positive=positive_prompt, negative=negative_prompt, style=style, mode=mode)
    return StoryState((backbone, flow_head, vae), Storyboard.start(story))


def add_panel(state: StoryState, prompt: str, seed: int, node_id=None) -> tuple[torch.Tensor, StoryState]:
    backbone, flow_head, vae = state.parts
    board = Storyboard(runner.pipeline_for(backbone, flow_head, vae))
    shape = board.shape(state.context)
    runner.load_parts(backbone, flow_head, vae, shape, node_id)
    panel = board.add_panel(state.context, prompt, seed=int(seed),
                            callback=TokenProgress(vae.module, backbone.module, shape.grid, node_id))
    return panel.image, replace(state, context=panel.context.offloaded())


class NextStepStoryboard:
    DESCRIPTION = ("A storyboard from one prompt per line: every panel continues the same sequence, so characters "
                   "and style carry over (NextStep was trained on interleaved stories). Panel i uses seed + i. The "
                   "story output continues with NextStep Storyboard Panel nodes.")
    CATEGORY = settings.CATEGORY
    FUNCTION = "storyboard"
    RETURN_TYPES = ("IMAGE", STORY)
    RETURN_NAMES = ("panels", "story")
    OUTPUT_TOOLTIPS = ("All panels as one IMAGE batch, in story order.",
                       "The story after the last panel: connect a NextStep Storyboard Panel to go on.")
    SEARCH_ALIASES = ["nextstep story", "comic", "storyboard"]

    @classmethod
    def INPUT_TYPES(cls):
        inputs = story_inputs()
        panels = {"panels": settings.prompt_input(
            "One panel prompt per line, in story order (blank lines are skipped).",
            "A girl with a red scarf finds a map in the attic.\nShe follows the map into a snowy forest.\n"
            "She discovers a glowing door between two pine trees.\nShe steps through into a summer meadow.")}
        return {"required": {**{k: inputs[k] for k in ("backbone", "flow_head", "vae")}, **panels,
                             **{k: v for k, v in inputs.items() if k not in ("backbone", "flow_head", "vae")},
                             "seed": settings.seed_input(CARD["seed"])},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    def storyboard(self, backbone, flow_head, vae, panels, style, positive_prompt, negative_prompt, width, height,
                   cfg, steps, timesteps_shift, use_norm, sampler, cfg_schedule, mode, seed, unique_id=None):
        prompts = [line.strip() for line in (panels or "").splitlines() if line.strip()]
        if not prompts:
            raise SettingsError("The storyboard has no panels: write one panel prompt per line.")
        state = start_story(backbone, flow_head, vae, style, positive_prompt, negative_prompt, width, height, cfg,
                            steps, timesteps_shift, use_norm, sampler, cfg_schedule, mode)
        images = []
        for i, prompt in enumerate(prompts):
            image, state = add_panel(state, prompt, int(seed) + i, unique_id)
            images.append(image)
        return (torch.cat(images), state)


class NextStepStoryStart:
    DESCRIPTION = ("Starts an empty story for a chain of NextStep Storyboard Panel nodes: the models, the panel "
                   "size and the settings every panel of the story uses.")
    CATEGORY = settings.CATEGORY
    FUNCTION = "start"
    RETURN_TYPES = (STORY,)
    RETURN_NAMES = ("story",)
    OUTPUT_TOOLTIPS = ("An empty story: connect it to the first NextStep Storyboard Panel.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": story_inputs()}

    def start(self, **kwargs):
        return (start_story(**kwargs),)


class NextStepStoryboardPanel:
    DESCRIPTION = ("One storyboard panel: draws the prompt as the next panel of the connected story, seeing every "
                   "earlier panel. The story input is never changed, so several panels can branch from one story.")
    CATEGORY = settings.CATEGORY
    FUNCTION = "panel"
    RETURN_TYPES = ("IMAGE", STORY)
    RETURN_NAMES = ("panel", "story")
    OUTPUT_TOOLTIPS = ("This panel's image.", "The story including this panel: connect the next panel.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "story": (STORY, {"tooltip": "From NextStep Story Start, NextStep Storyboard or the previous panel."}),
            "prompt": settings.prompt_input("What this panel shows."),
            "seed": settings.seed_input(CARD["seed"]),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def panel(self, story, prompt, seed, unique_id=None):
        if not isinstance(story, StoryState):
            raise SettingsError(f"The story input got {story!r}; connect NextStep Story Start, NextStep Storyboard "
                                "or another panel.")
        image, state = add_panel(story, prompt, seed, unique_id)
        return (image, state)
