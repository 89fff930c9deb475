"""Sampler maths against closed forms."""
import pytest
import torch

from nextstep_core.engine import SamplingSettings
from nextstep_core.errors import SettingsError
from nextstep_core.noise import TokenNoise, make_generator
from nextstep_core.samplers import (FoldedSteps, cfg_values, check_sampler, combine_cfg, draws_per_token,
                                    get_sampler, sampler_names, sde_step, shift_time)


def test_shift_is_identity_at_one_and_pushes_time_towards_noise_above_one():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_time(t, 1.0), t)
    shifted = shift_time(t, 3.2)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:-1] < t[1:-1]).all())
    torch.testing.assert_close(shifted[5], torch.tensor(0.5 / (3.2 - 2.2 * 0.5)))


def test_nextstep1_grid_stops_short_of_one_and_the_11_grid_ends_at_one():
    g1 = get_sampler("nextstep1").time_grid(28, 3.2)
    assert g1.shape == (28,) and g1[0] == 0
    torch.testing.assert_close(g1[-1], shift_time(torch.tensor(0.96), 3.2))
    g2 = get_sampler("nextstep1.1").time_grid(28, 1.0)
    assert g2.shape == (29,) and g2[-1] == 1.0
    torch.testing.assert_close(g2[:-1], torch.arange(28) / 28)


def test_sde_step_equals_simplified_drift():
    """drift = v + (1-t) score with score = (t v - x) / (1 - t) simplifies to (1 + t) v - x."""
    g = torch.Generator().manual_seed(0)
    x, v, w = (torch.randn(4, 64, generator=g) for _ in range(3))
    t, dt = torch.tensor(0.3), torch.tensor(0.05)
    want = x + ((1 + t) * v - x) * dt + torch.sqrt(2 * (1 - t)) * torch.sqrt(dt) * w
    torch.testing.assert_close(sde_step(x, v, t, dt, w), want, atol=1e-5, rtol=1e-5)


def test_noise_free_step_moves_along_the_velocity_towards_data():
    x, data = torch.zeros(1, 64), torch.ones(1, 64)
    t = torch.tensor(0.0)
    out = sde_step(x, data - x, t, torch.tensor(0.1), torch.zeros(1, 64))
    torch.testing.assert_close(out, torch.full((1, 64), 0.1))


def test_cfg_combination_formulas():
    cond, unc_img, unc = torch.full((2, 3), 3.0), torch.full((2, 3), 2.0), torch.full((2, 3), 1.0)
    assert torch.equal(combine_cfg(cond, 1, 5.0, 1.0), cond)
    torch.testing.assert_close(combine_cfg(torch.cat([cond, unc]), 2, 7.5, 1.0), unc + 7.5 * (cond - unc))
    three = combine_cfg(torch.cat([cond, unc_img, unc]), 3, 7.5, 2.0)
    torch.testing.assert_close(three, unc + 2.0 * (unc_img - unc) + 7.5 * (cond - unc_img))


def test_cfg_schedules():
    const = cfg_values("constant", 7.5, 2.0, 4)
    assert bool((const[:, 0] == 7.5).all()) and bool((const[:, 1] == 2.0).all())
    lin = cfg_values("linear", 7.5, 1.0, 4)[:, 0]
    torch.testing.assert_close(lin, torch.tensor([7.5, 1 + 6.5 * 3 / 4, 1 + 6.5 * 2 / 4, 1 + 6.5 / 4], dtype=torch.float64))
    ramp = cfg_values("linear-ramp", 7.5, 1.0, 4)[:, 0]
    torch.testing.assert_close(ramp, torch.tensor([3.75, 3.75, 4.25, 1 + 6.5 * 3 / 4], dtype=torch.float64))
    with pytest.raises(SettingsError, match=r"^cfg_schedule='cosine' is not a CFG schedule"):
        SamplingSettings(cfg_schedule="cosine")  # refused when the settings are made, not when they run


def test_bad_guidance_and_steps_are_rejected_with_the_fix():
    with pytest.raises(SettingsError, match=r"cfg=0.5 is below 1.*7.5"):
        SamplingSettings(cfg=0.5, cfg_img=1.0)
    with pytest.raises(SettingsError, match="cfg_img"):
        SamplingSettings(cfg=7.5, cfg_img=0.0)
    with pytest.raises(SettingsError, match="steps=0"):
        check_sampler("nextstep1.1", 0)
    with pytest.raises(SettingsError, match="steps=1"):
        check_sampler("nextstep1", 1)
    with pytest.raises(SettingsError, match="Unknown sampler"):
        check_sampler("euler", 28)


def test_one_big_draw_equals_the_official_sequence_of_small_draws():
    """Drawing a chunk of tokens at once must give the numbers the reference draws one by one."""
    steps, nr, rows = 5, 2, 6
    noise = TokenNoise(make_generator(42), draws_per_token("nextstep1", steps), nr, rows, 64, "cpu", total_tokens=3)
    got = [noise.for_token(k) for k in range(3)]
    torch.manual_seed(42)
    for k in range(3):
        for d in range(steps):
            want = torch.randn(nr, 64).repeat(rows // nr, 1)  # the reference's randn_tensor
            assert torch.equal(got[k][d], want)


def test_noise_never_draws_past_the_last_token():
    gen = make_generator(1)
    noise = TokenNoise(gen, 3, 1, 1, 64, "cpu", total_tokens=2)
    noise.for_token(0)
    noise.for_token(1)
    after = torch.randn(1, generator=gen)
    ref = make_generator(1)
    torch.randn(2 * 3 * 64, generator=ref)
    assert torch.equal(after, torch.randn(1, generator=ref))


@pytest.mark.parametrize("name", sampler_names())
def test_each_samplers_folded_step_is_its_exact_step(name):
    """What the fast path runs (x <- A x + B v + C w per evaluation) against the sampler's own
    step, on a velocity field that depends on x and the step: float32 rounding apart (measured
    max 2.4e-7), the same token. It also reads every noise draw it asks for, and no more."""
    sampler, steps = get_sampler(name), 6
    grid = sampler.time_grid(steps, 2.0)
    assert grid.dtype == torch.float32 and grid.shape[0] >= steps and grid[0] == 0
    g = torch.Generator().manual_seed(0)
    z = torch.randn(sampler.draws_per_token(steps), 3, 8, generator=g)
    target = torch.randn(3, 8, generator=g)

    def velocity(x, i):
        return target - x * (1 + 0.1 * i)

    exact = sampler.sample(velocity, z, sampler.constants(grid, steps))
    a, b, c = sampler.coefficients(grid, steps)
    assert len(a) == len(c) == b.shape[0] == steps
    x = z[0]
    for i in range(steps):
        v = velocity(x, i)
        x = (x if a[i] is None else a[i] * x) + b[i] * v + (0 if c[i] is None else c[i] * z[i + 1])
    torch.testing.assert_close(x, exact, atol=2e-6, rtol=0)
    moved = z.clone()
    moved[-1] += 1.0
    assert (sampler.sample(velocity, moved, sampler.constants(grid, steps)) - exact).abs().max() > 1e-3


@pytest.mark.parametrize("name", sampler_names())
@pytest.mark.parametrize("cfg_mult", [1, 2, 3])
def test_each_samplers_step_with_guidance_folded_in_is_its_exact_step(name, cfg_mult):
    """What the fast path runs (folded.py: the state kept as the CFG rows, guidance as one mixing
    product per step) against the sampler's own step on the guided velocity, for two images whose
    CFG rows see different velocity fields: float32 rounding apart (measured max 5.7e-6 on values
    up to 15 at cfg 7.5, cfg_img 2), the same token, and the rows of one image stay copies (measured:
    equal)."""
    sampler, steps, images = get_sampler(name), 6, 2
    grid = sampler.time_grid(steps, 2.0)
    g = torch.Generator().manual_seed(1)
    draws = sampler.draws_per_token(steps)
    z = torch.randn(draws, images, 8, generator=g)
    target = torch.randn(cfg_mult * images, 8, generator=g)  # one field per row: cond, image, uncond
    scale = torch.tensor([7.5, 2.0])

    def rows_velocity(xr, i):
        return target - xr * (1 + 0.1 * i)

    exact = sampler.sample(lambda x, i: combine_cfg(rows_velocity(x.repeat(cfg_mult, 1), i), cfg_mult, *scale),
                           z, sampler.constants(grid, steps))
    fold = FoldedSteps(sampler.coefficients(grid, steps), cfg_mult, cfg_mult * images, draws, "cpu")
    x, mix, noise = fold.start(z, scale)
    for i in range(steps):
        x = fold.step(i, x, rows_velocity(x, i), mix, noise)
    torch.testing.assert_close(fold.token(x), exact, atol=2e-5, rtol=0)
    torch.testing.assert_close(x, fold.token(x).repeat(cfg_mult, 1), atol=2e-5, rtol=0)


def test_auto_picks_each_cards_sampler_from_the_samplers_own_lists():
    from nextstep_core.presets import PRESETS, preset
    from nextstep_core.samplers import default_sampler
    assert {v: preset(v)["sampler"] for v in PRESETS} == {
        "nextstep1-large": "nextstep1", "nextstep1-large-pretrain": "nextstep1", "nextstep1-large-edit": "nextstep1",
        "nextstep1.1": "nextstep1.1", "nextstep1.1-pretrain": "nextstep1.1"}
    assert preset("some-finetune")["sampler"] == "nextstep1"  # an unknown folder gets the NextStep-1-Large card
    with pytest.raises(SettingsError, match="exactly one sampler"):
        default_sampler("some-finetune")


def test_the_cli_and_the_engine_read_one_table_of_samplers_and_schedules(capsys):
    from nextstep_core.cli import build_parser
    from nextstep_core.samplers import CFG_SCHEDULES
    assert sampler_names() == ["nextstep1", "nextstep1.1", "ode"]
    assert list(CFG_SCHEDULES) == ["constant", "linear", "linear-ramp"]
    parse = build_parser().parse_args
    base = ["generate", "--model", "m", "--prompt", "x", "--out", "o.png"]
    for name in sampler_names():
        assert parse(base + ["--sampler", name]).sampler == name
    for schedule in CFG_SCHEDULES:
        assert parse(base + ["--cfg-schedule", schedule]).cfg_schedule == schedule
    with pytest.raises(SystemExit):
        parse(base + ["--sampler", "euler"])
    err = capsys.readouterr().err
    assert "euler" in err and all(name in err for name in sampler_names())
    with pytest.raises(SettingsError, match="constant, linear, linear-ramp"):
        SamplingSettings(cfg_schedule="cosine")
