"""The demo model: deterministic, loads with transformers offline, generates, converts bit-exactly."""

from __future__ import annotations

import math

import pytest
import torch

from ember.ckpt_format import read_state_dict
from ember.ckpt_format.demo_model import SIZES, build_demo_model, train_tokenizer, weight_shapes
from ember.ckpt_format.spec import DTYPE_ITEMSIZE


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_same_seed_same_bytes_other_seed_other_weights(demo_hf_dir, tmp_path):
    build_demo_model(tmp_path / "again", "tiny", seed=0)
    build_demo_model(tmp_path / "other", "tiny", seed=1)
    for f in demo_hf_dir.iterdir():
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != (demo_hf_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "other" / "tokenizer.json").read_bytes() == (demo_hf_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(("size", "low", "high"), [("tiny", 5e6, 15e6), ("small", 120e6, 180e6), ("medium", 0.85e9, 1.2e9)])
def test_documented_sizes(size, low, high):
    vocab = train_tokenizer().get_vocab_size()
    dims = SIZES[size]
    nbytes = sum(math.prod(s) for _, s in weight_shapes(dims, vocab)) * DTYPE_ITEMSIZE[dims.dtype]
    assert low < nbytes < high


def test_loads_in_transformers_and_generates(demo_hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(demo_hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(demo_hf_dir)
    ids = tok("The keeper climbed the tower", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id
    assert tok.decode(ids[0], skip_special_tokens=True) == "The keeper climbed the tower"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|bos|><|user|>\nHello<|end|>\n<|assistant|>\n"
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        again = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        logits = model(ids).logits[0, -1]
    assert out.shape[1] == ids.shape[1] + 8 and torch.equal(out, again)
    top2 = logits.topk(2).values
    assert (top2[0] - top2[1]).item() > 1e-3  # clear argmax: greedy is stable across code paths


def test_converted_demo_model_matches_safetensors(demo_hf_dir, demo_checkpoint):
    from safetensors.torch import load_file

    want = load_file(demo_hf_dir / "model.safetensors")
    got = read_state_dict(demo_checkpoint)
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


def test_converted_checkpoint_carries_config_and_tokenizer(demo_checkpoint):
    from transformers import AutoConfig, AutoTokenizer

    from ember.ckpt_format import open_checkpoint

    index = open_checkpoint(demo_checkpoint)
    assert index.config["model_type"] == "llama" and index.generation_config["do_sample"] is False
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(index.files)
    assert AutoConfig.from_pretrained(demo_checkpoint).num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(demo_checkpoint).eos_token == "<|eos|>"
