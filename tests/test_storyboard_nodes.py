"""The storyboard nodes as ComfyUI calls them: the single node, the chain, branching, edit chain."""
import pytest
import torch

from host_stand_in import host, models_dir, pack  # noqa: F401
from test_nodes import call, check_outputs, load_parts, result_of, widget_defaults
from parity_support import assert_images_close

STORY_SETTINGS = dict(width=32, height=32, steps=2)
PANELS = ["a girl finds a map", "she walks into a forest", "she finds a door"]


def story_args(pack, parts, cls="NextStepStoryStart", **over):
    args = widget_defaults(pack.NODE_CLASS_MAPPINGS[cls])
    args.update(dict(zip(("backbone", "flow_head", "vae"), parts)), **STORY_SETTINGS)
    return {**args, **over}


def test_chained_panels_equal_the_single_node(pack, host):
    m = pack.NODE_CLASS_MAPPINGS
    parts = load_parts(pack)
    single_cls = m["NextStepStoryboard"]
    out = call(single_cls, **story_args(pack, parts, "NextStepStoryboard", panels="\n".join(PANELS) + "\n\n", seed=5))
    check_outputs(single_cls, out)
    images, story = result_of(out)
    assert images.shape == (3, 32, 32, 3) and story.panels == 3
    (state,) = result_of(call(m["NextStepStoryStart"], **story_args(pack, parts)))
    for i, prompt in enumerate(PANELS):
        image, state = result_of(call(m["NextStepStoryboardPanel"], story=state, prompt=prompt, seed=5 + i))
        assert_images_close(image, images[i:i + 1])
    # contexts wait in CPU RAM between nodes
    assert state.context.cache.valid.device.type == "cpu"
    assert host.progress[-1][:2] == (4, 4)  # progress restarts per panel: 4 tokens of 32x32


def test_two_panels_from_one_story_do_not_disturb_each_other(pack, host):
    m = pack.NODE_CLASS_MAPPINGS
    parts = load_parts(pack)
    (start,) = result_of(call(m["NextStepStoryStart"], **story_args(pack, parts)))
    _, two = result_of(call(m["NextStepStoryboardPanel"], story=start, prompt=PANELS[0], seed=1))
    a1, _ = result_of(call(m["NextStepStoryboardPanel"], story=two, prompt="branch A", seed=2))
    call(m["NextStepStoryboardPanel"], story=two, prompt="branch B", seed=2)
    a2, _ = result_of(call(m["NextStepStoryboardPanel"], story=two, prompt="branch A", seed=2))
    assert torch.equal(a1, a2) and two.panels == 1


def test_edit_chain_mode_edits_the_previous_panel(pack, host):
    m = pack.NODE_CLASS_MAPPINGS
    parts = load_parts(pack, "NextStep-1-Large-Edit")
    out = call(m["NextStepStoryboard"], **story_args(pack, parts, "NextStepStoryboard", panels="a cat\nmake it blue",
                                                      mode="edit chain", seed=1))
    images, story = result_of(out)
    assert images.shape == (2, 32, 32, 3) and story.mode == "edit chain" and story.last_image is not None


def test_storyboard_node_errors(pack, host):
    from comfyui_nextstep_under_test.nextstep_core.errors import SettingsError
    m = pack.NODE_CLASS_MAPPINGS
    parts = load_parts(pack)
    with pytest.raises(SettingsError, match="no panels"):
        call(m["NextStepStoryboard"], **story_args(pack, parts, "NextStepStoryboard", panels=" \n", seed=1))
    with pytest.raises(SettingsError, match="connect NextStep Story Start"):
        call(m["NextStepStoryboardPanel"], story="nope", prompt="x", seed=1)
    with pytest.raises(SettingsError, match=r"^width=30 is not a multiple of 16 between 16 and 2048"):
        call(m["NextStepStoryboard"], **story_args(pack, parts, "NextStepStoryboard", panels="a", seed=1, width=30))
    with pytest.raises(SettingsError, match=r"^timesteps_shift=nan is not a finite number"):
        call(m["NextStepStoryStart"], **story_args(pack, parts, "NextStepStoryStart", timesteps_shift=float("nan")))
