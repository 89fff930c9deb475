"""Loading every on-disk form the Hub repos ship, and refusing what is broken with a clear message."""
import json
import os
import shutil

import pytest
import torch

from nextstep_core.checkpoint import load_backbone, load_flow_head, load_vae, model_variant
from nextstep_core.engine import SamplingSettings
from nextstep_core.errors import CheckpointError
from nextstep_core.pipeline import NextStepPipeline, Request
from nextstep_core.tiny import write_tiny
from parity_support import assert_tokens_close

QUICK = SamplingSettings(steps=3)


def pipeline(folder):
    bb, tok = load_backbone(folder)
    return NextStepPipeline(bb, tok, load_flow_head(folder), load_vae(folder))


def test_the_checkpoint_written_by_another_program_loads_and_generates(official_fixture):
    pipe = pipeline(official_fixture)
    assert not pipe.backbone.cfg.o_bias and pipe.backbone.lm_head is None
    assert pipe.tokenizer.boi_id == pipe.backbone.cfg.ids["boi"]  # special ids found by name agree with config
    out = pipe.run(Request(["a lighthouse"], 48, 32, seed=3, sampling=QUICK))
    assert out.images.shape == (1, 32, 48, 3) and out.tokens.shape == (1, 6, 64)


def test_sharded_v11_checkpoint_with_o_bias_equals_its_single_file_twin(tmp_path):
    one = write_tiny(str(tmp_path / "NextStep-1.1-a"), v11=True, o_bias=True, seed=4)
    many = write_tiny(str(tmp_path / "NextStep-1.1-b"), v11=True, o_bias=True, seed=4, shards=3)
    assert os.path.isfile(os.path.join(many, "model.safetensors.index.json"))
    a, b = pipeline(one), pipeline(many)
    assert a.backbone.cfg.o_bias and a.backbone.layers[0].self_attn.o_proj.bias is not None
    req = Request(["x"], 32, 32, seed=1, sampling=QUICK)
    for (k, v), (k2, v2) in zip(sorted(a.backbone.state_dict().items()), sorted(b.backbone.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k  # the same numbers read from one file or three
    # weights memory-mapped at other offsets may take other SIMD paths: the last bits can move
    assert_tokens_close(a.run(req).tokens, b.run(req).tokens)
    assert model_variant(one) == "nextstep1.1"


def test_lm_head_is_read_only_when_text_generation_needs_it(tiny_model):
    bb, _ = load_backbone(tiny_model)
    assert bb.lm_head is None
    bb, _ = load_backbone(tiny_model, with_lm_head=True)
    assert bb.lm_head is not None and bb.logits(torch.zeros(1, bb.cfg.hidden_size)).shape[-1] == bb.cfg.vocab_size


def test_weights_are_loaded_in_the_requested_dtype(tiny_model):
    bb, _ = load_backbone(tiny_model, dtype=torch.bfloat16)
    assert {p.dtype for p in bb.parameters()} == {torch.bfloat16}


def test_model_variant_follows_the_repo_name(tmp_path):
    for name, want in [("NextStep-1-Large", "nextstep1-large"), ("NextStep-1-Large-Edit", "nextstep1-large-edit"),
                       ("NextStep-1-Large-Pretrain", "nextstep1-large-pretrain"), ("NextStep-1.1", "nextstep1.1"),
                       ("NextStep-1.1-Pretrain", "nextstep1.1-pretrain")]:
        assert model_variant(str(tmp_path / name)) == want


def copy_of(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_a_vae_folder_given_as_the_model_says_what_it_is(tiny_model):
    with pytest.raises(CheckpointError, match="looks like a NextStep VAE"):
        load_backbone(os.path.join(tiny_model, "vae"))


def test_a_missing_folder_and_a_plain_language_model_are_named(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(str(tmp_path / "nope"))
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(CheckpointError, match="plain qwen2 language model"):
        load_backbone(str(qwen))


def test_missing_tokenizer_files(tiny_model, tmp_path):
    dst = copy_of(tiny_model, tmp_path)
    os.remove(dst / "tokenizer.json")
    with pytest.raises(CheckpointError, match="No tokenizer.json.*tokenizer files"):
        load_backbone(str(dst))


def test_a_plain_qwen_tokenizer_without_nextstep_tokens_is_refused(tiny_model, tmp_path):
    dst = copy_of(tiny_model, tmp_path)
    data = json.loads((dst / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if "image" not in t["content"]]
    (dst / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="lacks NextStep's tokens"):
        load_backbone(str(dst))


def test_missing_vae(tiny_model, tmp_path):
    dst = copy_of(tiny_model, tmp_path)
    os.remove(dst / "vae" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="no VAE weights"):
        load_vae(str(dst))


def test_config_and_weights_of_different_sizes(tiny_model, tmp_path):
    dst = copy_of(tiny_model, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has shape .* but config.json implies"):
        load_backbone(str(dst))


def test_a_truncated_download_is_named_with_its_sizes(tiny_model, tmp_path):
    dst = copy_of(tiny_model, tmp_path)
    path = dst / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=r"truncated.*download this file again"):
        load_backbone(str(dst))


def test_a_missing_shard_is_reported(tmp_path):
    folder = write_tiny(str(tmp_path / "m"), shards=2)
    os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 of its 2 weight shards"):
        load_backbone(folder)


def test_parts_from_different_models_are_refused_when_they_meet(tiny_model, tmp_path):
    other = write_tiny(str(tmp_path / "wide"), hidden=96, heads=4, head_width=32)
    bb, tok = load_backbone(tiny_model)
    with pytest.raises(CheckpointError, match="same model folder"):
        NextStepPipeline(bb, tok, load_flow_head(other), load_vae(tiny_model))


def test_layers_are_built_through_an_injectable_ops_namespace(tiny_model):
    """A host (ComfyUI) can hand in its own layer classes, as its own models are built."""
    import types
    from nextstep_core.checkpoint import load_flow_head

    made = []

    class CountingLinear(torch.nn.Linear):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    ops = types.SimpleNamespace(Linear=CountingLinear, Embedding=torch.nn.Embedding)
    bb, _ = load_backbone(tiny_model, ops=ops)
    head = load_flow_head(tiny_model, ops=ops)
    assert isinstance(bb.layers[0].self_attn.q_proj, CountingLinear)
    assert isinstance(head.net.input_proj, CountingLinear)
    assert len(made) == 7 * len(bb.layers) + 2 + sum(1 for m in head.modules() if isinstance(m, CountingLinear))


def test_model_variant_of_a_hugging_face_cache_snapshot(tmp_path):
    snap = tmp_path / "hub" / "models--stepfun-ai--NextStep-1-Large-Edit" / "snapshots" / "0123abcd"
    assert model_variant(str(snap)) == "nextstep1-large-edit"
    snap11 = tmp_path / "hub" / "models--stepfun-ai--NextStep-1.1" / "snapshots" / "0123abcd"
    assert model_variant(str(snap11)) == "nextstep1.1"
