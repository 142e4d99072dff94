"""ember.loader.load_model: same logits as transformers' from_pretrained, no random init, tied
weights re-tied, rotary buffers computed, DRAM-pool models zero-copy."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ember.ckpt_format import convert
from ember.loader import DramPool, LoaderError, last_load_stats, load_model


@pytest.fixture(scope="module")
def reference(demo_hf_dir):
    return AutoModelForCausalLM.from_pretrained(demo_hf_dir).eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=g)
    with torch.no_grad():
        return model(ids).logits


def test_logits_equal_from_pretrained(demo_checkpoint, reference):
    model = load_model(demo_checkpoint)
    assert type(model) is type(reference)
    assert not model.training
    assert model.dtype == reference.dtype
    assert torch.equal(logits(model), logits(reference))
    for (n1, b1), (n2, b2) in zip(reference.named_buffers(), model.named_buffers(), strict=True):
        assert n1 == n2 and b1.dtype == b2.dtype and torch.equal(b1, b2), n1
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.generation_config.eos_token_id == reference.generation_config.eos_token_id
    assert model.ember_load_stats.tier == "disk"


def test_greedy_generation_matches(demo_checkpoint, reference):
    model = load_model(demo_checkpoint)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    a = reference.generate(ids, max_new_tokens=8, do_sample=False)
    b = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_no_random_initialisation_runs(demo_checkpoint):
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    load_model(demo_checkpoint)
    assert torch.equal(torch.rand(4), expected)  # the CPU RNG was never drawn from


def test_tied_embeddings_are_retied(tmp_path):
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, rope_theta=500.0,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ckpt = convert(tmp_path / "hf", tmp_path / "ember").path
    index = json.loads((ckpt / "ember.json").read_text())
    assert "lm_head.weight" not in index["tensors"]  # stored once
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model = load_model(ckpt)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model), logits(ref))


def test_dram_pool_model_is_zero_copy(demo_checkpoint, reference):
    pool = DramPool(256 << 20, pin=False)
    first = load_model(demo_checkpoint, pool=pool)
    second = load_model(demo_checkpoint, pool=pool)
    stats = last_load_stats()
    assert stats.tier == "dram" and stats.zero_copy
    assert second.ember_load_stats is stats
    for (name, p1), (_, p2) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert p1.data_ptr() == p2.data_ptr(), name
    assert torch.equal(logits(second), logits(reference))


def test_dtype_cast(demo_checkpoint, reference):
    model = load_model(demo_checkpoint, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.allclose(logits(model).float(), logits(reference), atol=0.5, rtol=0.1)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_checkpoint_without_config_is_refused(make_checkpoint):
    ckpt = make_checkpoint({"w": torch.ones(3)})
    with pytest.raises(LoaderError, match="no model config"):
        load_model(ckpt)


def test_tensor_parallel_model_is_refused(demo_checkpoint):
    with pytest.raises(LoaderError, match="tp_size=2"):
        load_model(demo_checkpoint, tp_rank=0, tp_size=2)


def test_checkpoint_missing_weights_is_refused(demo_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "hf"
    shutil.copytree(demo_hf_dir, src)
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    ckpt = convert(src, tmp_path / "ember").path
    with pytest.raises(LoaderError, match="down_proj"):
        load_model(ckpt)
