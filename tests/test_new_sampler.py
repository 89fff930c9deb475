"""Adding a sampler is one file: a module dropped into the engine's samplers package is offered by
every node's sampler widget and by the CLI's --sampler, and the engine samples with it (exact and
fast paths), end to end on the tiny checkpoint."""
from __future__ import annotations

import importlib
import sys

import pytest
from safetensors.torch import load_file

import test_nodes as node_calls
from host_stand_in import host, models_dir, pack  # noqa: F401
from parity_support import assert_tokens_close

# Euler on a uniform grid that ignores the shift: at shift 1 it is the `ode` sampler, so the engine
# must have asked this file for its grid when a shifted run matches an unshifted `ode` run.
TOY = '''"""Euler on a uniform grid that ignores the time shift."""
import torch

from .base import Sampler


class Uniform(Sampler):
    name = "toy-uniform"
    description = "Euler on a uniform grid, no shift"

    def draws_per_token(self, steps):
        return 1

    def time_grid(self, steps, shift):
        return torch.linspace(0, 1, steps + 1)

    def constants(self, grid, steps):
        return grid[1:] - grid[:-1]

    def sample(self, velocity, z, dts):
        x = z[0]
        for i in range(dts.shape[0]):
            x = x + velocity(x, i) * dts[i]
        return x

    def coefficients(self, grid, steps):
        return [None] * steps, grid[1:] - grid[:-1], [None] * steps
'''


@pytest.fixture
def toy_sampler(pack, tmp_path, monkeypatch):  # noqa: F811
    """The toy module in a folder of the samplers package, as if the file had been added there."""
    samplers = pack.nextstep_core.samplers
    folder = tmp_path / "more_samplers"
    folder.mkdir()
    (folder / "toy_uniform.py").write_text(TOY)
    monkeypatch.setattr(samplers, "__path__", [*samplers.__path__, str(folder)])
    monkeypatch.setattr(samplers.registry, "_found", None)  # read the folder again at the next lookup
    yield "toy-uniform"
    sys.modules.pop(f"{samplers.__name__}.toy_uniform", None)


def test_a_sampler_file_is_offered_everywhere_and_sampled_with(pack, host, toy_sampler, tmp_path):  # noqa: F811
    core, m = pack.nextstep_core, pack.NODE_CLASS_MAPPINGS
    for node in ("NextStepTextToImage", "NextStepEdit", "NextStepStoryboard"):
        spec = m[node].INPUT_TYPES()["required"]["sampler"]
        assert spec[0] == ["auto", "nextstep1", "nextstep1.1", "ode", toy_sampler], node
        assert f"{toy_sampler}: Euler on a uniform grid, no shift." in spec[1]["tooltip"]

    # the node runs it
    cls = m["NextStepTextToImage"]
    parts = node_calls.load_parts(pack)
    images, _ = node_calls.check_outputs(cls, node_calls.call(cls, **node_calls.t2i_args(
        pack, parts, sampler=toy_sampler, width=32, height=32)))
    assert images.shape == (1, 32, 32, 3)

    # the engine asks it for its grid and its step, in both paths
    pipe = core.pipeline.NextStepPipeline(parts[0].module, parts[0].tokenizer, parts[1].module, parts[2].module)

    def tokens(sampler, shift, exact):
        s = core.engine.SamplingSettings(steps=3, cfg=3.0, sampler=sampler, shift=shift)
        return pipe.run(core.pipeline.Request(["a"], 32, 32, seed=5, sampling=s,
                                              execution=core.engine.Execution(exact=exact))).tokens

    for exact in (True, False):
        toy = tokens(toy_sampler, 2.5, exact)
        assert_tokens_close(toy, tokens("ode", 1.0, exact))
        assert (toy - tokens("ode", 2.5, exact)).abs().max() > 1e-2  # the shift would have moved it
    assert_tokens_close(tokens(toy_sampler, 2.5, False), tokens(toy_sampler, 2.5, True))

    # the command line offers and runs it
    out = tmp_path / "toy.safetensors"
    model = str(host.models_dir / "nextstep" / "NextStep-1-Large")
    cli = importlib.import_module(f"{pack.__name__}.nextstep_core.cli")
    assert cli.main(["generate", "--model", model, "--prompt", "a", "--width", "32", "--height", "32",
                     "--steps", "3", "--cfg", "3.0", "--shift", "2.5", "--seed", "5", "--sampler", toy_sampler,
                     "--quiet", "--out", str(tmp_path / "toy.png"), "--tokens-out", str(out)]) == 0
    assert load_file(out)["tokens"].shape == (1, 4, 64)


def test_without_the_file_it_is_not_offered(pack):  # noqa: F811
    names = pack.nextstep_core.samplers.sampler_names()
    assert "toy-uniform" not in names and names == ["nextstep1", "nextstep1.1", "ode"]
    with pytest.raises(pack.nextstep_core.errors.SettingsError, match="Unknown sampler 'toy-uniform'"):
        pack.nextstep_core.samplers.check_sampler("toy-uniform", 3)
