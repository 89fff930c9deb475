"""Shared fixtures: tiny checkpoints written by the pack itself, and the one written by another
program in the official layout (found beside the checkout, as CI lays it out)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OFFICIAL_FIXTURE = ROOT.parent / "shared" / "fixtures" / "nextstep-tiny-official-layout"
GOLDEN = ROOT / "tests" / "golden"

if not os.environ.get("OMP_NUM_THREADS"):  # a thread count you set is kept (the bounds cover 1 or 2)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from nextstep_core.tiny import write_tiny
    return write_tiny(str(tmp_path_factory.mktemp("models") / "NextStep-1-Large-tiny"))


@pytest.fixture(scope="session")
def tiny_edit_model(tmp_path_factory) -> str:
    from nextstep_core.tiny import write_tiny
    return write_tiny(str(tmp_path_factory.mktemp("models") / "NextStep-1-Large-Edit-tiny"), edit=True, seed=1)


@pytest.fixture(scope="session")
def official_fixture() -> str:
    if not OFFICIAL_FIXTURE.is_dir():
        pytest.skip(f"the shared fixture {OFFICIAL_FIXTURE.name} is not beside this checkout")
    return str(OFFICIAL_FIXTURE)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model):
    from nextstep_core.checkpoint import load_backbone, load_flow_head, load_vae
    from nextstep_core.pipeline import NextStepPipeline
    bb, tok = load_backbone(tiny_model)
    return NextStepPipeline(bb, tok, load_flow_head(tiny_model), load_vae(tiny_model))
