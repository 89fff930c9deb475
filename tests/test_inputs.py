"""Bad or unusual user inputs to the pipeline: each gets a clear error or is converted."""
import pytest
import torch
from PIL import Image

from nextstep_core.engine import SamplingSettings
from nextstep_core.errors import InputImageError, SettingsError
from nextstep_core.images import bucket_sizes, fit_image, nearest_bucket, open_image
from nextstep_core.limits import check_size
from nextstep_core.pipeline import Request

QUICK = SamplingSettings(steps=2)


def test_sizes_must_be_multiples_of_16_and_the_error_names_the_nearest():
    with pytest.raises(SettingsError, match="height=500 .* use 496 or 512"):
        check_size(512, 500)
    with pytest.raises(SettingsError, match="width=8"):
        check_size(8, 512)


def test_empty_prompt_list(tiny_pipeline):
    with pytest.raises(SettingsError, match="No prompt"):
        tiny_pipeline.run(Request([], 32, 32, sampling=QUICK))


def test_seed_range(tiny_pipeline):
    with pytest.raises(SettingsError, match="seed"):
        tiny_pipeline.run(Request(["x"], 32, 32, seed=-1, sampling=QUICK))
    tiny_pipeline.run(Request(["x"], 16, 16, seed=2 ** 64 - 1, sampling=QUICK))


def test_unreadable_and_missing_images(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputImageError, match="cannot be read as an image"):
        open_image(bad)
    with pytest.raises(InputImageError, match="does not exist"):
        open_image(tmp_path / "none.png")


def test_rgba_grayscale_and_palette_images_become_rgb():
    rgba = open_image(Image.new("RGBA", (4, 4), (255, 0, 0, 0)))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert open_image(Image.new("L", (4, 4), 7)).getpixel((1, 1)) == (7, 7, 7)
    assert open_image(Image.new("P", (4, 4))).mode == "RGB"


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif)
    assert open_image(path).size == (20, 40)


@pytest.mark.parametrize("mode", ["bucket", "center-crop", "resize"])
def test_every_fit_mode_gives_a_valid_size(mode):
    out = fit_image(Image.new("RGB", (333, 517)), mode, 256)
    assert out.size[0] % 16 == 0 and out.size[1] % 16 == 0


def test_buckets_at_512_are_the_official_pixel_sizes():
    sizes = bucket_sizes(512)
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes and (480, 544) in sizes
    assert nearest_bucket(1080, 1920) == (384, 672)


def test_fit_none_refuses_odd_sizes():
    with pytest.raises(SettingsError, match="multiples of 16"):
        fit_image(Image.new("RGB", (50, 64)), "none")


def test_edit_batch_one_instruction_for_many_images(tiny_pipeline):
    imgs = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    req = Request(["make it green"], None, None, sampling=SamplingSettings(steps=2, cfg_img=2.0), edit_images=imgs,
                  fit="center-crop", fit_base=32)
    out = tiny_pipeline.run(req)
    assert out.images.shape == (2, 32, 32, 3)
    assert out.rows.cfg_mult == 3 and out.rows.input_ids.shape[0] == 6
    with pytest.raises(SettingsError, match="2 edit instructions but 3 input images"):
        tiny_pipeline.run(Request(["a", "b"], None, None, sampling=QUICK, edit_images=imgs + imgs[:1]))


def test_the_callback_sees_every_token_and_can_cancel(tiny_pipeline):
    from nextstep_core.errors import Cancelled
    seen = []

    def cb(done, total, tokens):
        seen.append((done, total))
        if done == 3:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        tiny_pipeline.run(Request(["x"], 32, 48, sampling=QUICK), cb)
    assert seen == [(1, 6), (2, 6), (3, 6)]
    assert tiny_pipeline.run(Request(["x"], 32, 32, sampling=QUICK)).tokens.shape == (1, 4, 64)


def _input_tokens(result, tokenizer) -> int:
    return int((result.rows.input_ids[0] == tokenizer.placeholder_id).sum())


@pytest.mark.parametrize("fit,size,want_out,want_in", [
    ("resize", (64, 32), (32, 64), 2 * 4),    # the input stretched to the output size (StepFun's example)
    ("bucket", (64, 32), (32, 64), 2 * 4),    # covered and centre-cropped to it
    ("none", (64, 64), (64, 64), 2 * 3),      # the input as it is (48x32); only the output has the size
    ("bucket", None, (32, 48), 2 * 3),        # no size: the nearest bucket at fit_base, output = fitted input
])
def test_edit_inputs_follow_the_output_size_when_one_is_given(tiny_edit_model, fit, size, want_out, want_in):
    from PIL import Image
    from nextstep_core.checkpoint import load_backbone, load_flow_head, load_vae
    from nextstep_core.pipeline import NextStepPipeline
    bb, tok = load_backbone(tiny_edit_model)
    pipe = NextStepPipeline(bb, tok, load_flow_head(tiny_edit_model), load_vae(tiny_edit_model))
    img = Image.new("RGB", (48, 32), (200, 30, 30))
    w, h = size or (None, None)
    req = Request(["make it blue"], w, h, seed=1, edit_images=[img], fit=fit, fit_base=32,
                  sampling=SamplingSettings(steps=2, cfg=2.0, cfg_img=1.5))
    result = pipe.run(req)
    assert tuple(result.images.shape[1:3]) == want_out
    assert _input_tokens(result, tok) == want_in


def test_an_edit_request_checks_and_fits_its_inputs_once_when_made():
    """Every edit setting is refused as the request is made, before any work, and the fitted size is
    known then (the nodes read it for their preview instead of fitting the images themselves)."""
    from PIL import Image
    img = Image.new("RGB", (333, 517))
    req = Request(["x"], None, None, edit_images=[img], fit="bucket", fit_base=256)
    assert req.size == req.edit_inputs[1][0].size and req.size[0] % 16 == 0 and req.size[1] % 16 == 0
    assert Request(["x"], 64, 32, edit_images=[img], fit="resize").size == (64, 32)
    assert Request(["a", "b"], None, None, edit_images=[img], fit_base=256).batch == 2
    bad = [(dict(fit_base=500), r"^size=500 is not a multiple of 16 .*use 496 or 512"),
           (dict(fit="stretch"), r"^fit='stretch' is not a fit mode; choose one of bucket"),
           (dict(fit="none"), r"^The input image is 333x517; with fit 'none'"),
           (dict(edit_images=[img, img], prompts=["a", "b", "c"]), "3 edit instructions but 2 input images"),
           (dict(edit_images=["cat.png"]), "edit_images must be PIL images"),
           (dict(prompts=["<image> then <image>"]), "has 2 <image> tags; use one")]
    for over, message in bad:
        with pytest.raises(SettingsError, match=message):
            Request(**{**dict(prompts=["x"], width=None, height=None, edit_images=[img]), **over})
    # fit none takes no base size, so none is checked
    assert Request(["x"], None, None, edit_images=[Image.new("RGB", (48, 32))], fit="none", fit_base=500).size == (48, 32)
