"""Partition balance, layout invariants and shared (tied) tensors."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.ckpt_format import convert, open_checkpoint, read_state_dict
from ember.ckpt_format.layout import plan_layout
from ember.ckpt_format.spec import align_up


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.dictionaries(st.text("abcdefgh", min_size=1, max_size=5), st.integers(0, 1 << 22), max_size=40),
    partitions=st.integers(1, 8),
    alignment=st.sampled_from([4096, 65536]),
)
def test_layout_is_aligned_disjoint_and_balanced(sizes, partitions, alignment):
    placements, part_sizes = plan_layout(sizes, partitions, alignment)
    assert set(placements) == set(sizes) and len(part_sizes) == partitions
    fill = [0] * partitions
    for p in range(partitions):
        members = sorted((n for n in sizes if placements[n].partition == p), key=lambda n: (placements[n].offset, sizes[n]))
        end = 0
        for n in members:
            assert placements[n].offset % alignment == 0
            if sizes[n]:
                assert placements[n].offset >= end, "tensors overlap"
            end = max(end, placements[n].offset + sizes[n])
            fill[p] += align_up(sizes[n], alignment)
        assert part_sizes[p] == align_up(end, alignment) == fill[p]
    # LPT greedy: no partition exceeds another by more than the largest (aligned) tensor
    largest = max((align_up(s, alignment) for s in sizes.values()), default=0)
    assert max(fill) - min(fill) <= largest
    assert plan_layout(dict(reversed(list(sizes.items()))), partitions, alignment) == (placements, part_sizes)


def test_partitions_balanced_on_a_real_model(demo_hf_dir, tmp_path):
    index = convert(demo_hf_dir, tmp_path / "out", partitions=4)
    sizes = [p.size for p in index.partitions]
    largest = max(t.nbytes for t in index.tensors.values())
    assert max(sizes) - min(sizes) <= align_up(largest, index.alignment)
    assert sum(sizes) < index.tensor_bytes * 1.01
    assert all(p.stat().st_size == s for p, s in zip(sorted((tmp_path / "out").glob("part-*.bin")), sizes))


def test_tied_tensors_in_torch_state_dict_stored_once(tmp_path):
    emb = torch.randn(300, 64)
    sd = {"model.embed_tokens.weight": emb, "x": torch.ones(3), "lm_head.weight": emb, "view": emb[:10], "copy": emb.clone()}
    torch.save(sd, tmp_path / "s.pt")
    index = convert(tmp_path / "s.pt", tmp_path / "out")
    assert index.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert set(index.tensors) == {"model.embed_tokens.weight", "x", "view", "copy"}
    back = read_state_dict(tmp_path / "out")
    assert back["lm_head.weight"] is back["model.embed_tokens.weight"]
    assert torch.equal(back["view"], emb[:10]) and torch.equal(back["copy"], emb)


def test_shared_tensors_from_safetensors_metadata(tmp_path):
    from safetensors.torch import save_model

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(50, 8)
    model.head = torch.nn.Linear(8, 50, bias=False)
    model.head.weight = model.embed.weight
    save_model(model, str(tmp_path / "m.safetensors"))
    index = convert(tmp_path / "m.safetensors", tmp_path / "out")
    assert len(index.tensors) == 1 and len(index.aliases) == 1
    back = read_state_dict(tmp_path / "out")
    assert back["head.weight"] is back["embed.weight"]
    assert torch.equal(back["embed.weight"], model.embed.weight.detach())


@pytest.mark.parametrize("tie", [True, False])
def test_tie_word_embeddings_from_hf_config(tmp_path, tie):
    from safetensors.torch import save_file

    m = tmp_path / "m"
    m.mkdir()
    save_file({"model.embed_tokens.weight": torch.randn(20, 4), "model.norm.weight": torch.ones(4)}, str(m / "model.safetensors"))
    (m / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": tie}))
    index = convert(m, tmp_path / "out")
    assert index.aliases == ({"lm_head.weight": "model.embed_tokens.weight"} if tie else {})
    assert index.config["tie_word_embeddings"] is tie


def test_empty_and_zero_d_tensors_share_offsets_legally(tmp_path):
    sd = {"a": torch.empty(0), "b": torch.empty(3, 0, dtype=torch.int64), "c": torch.tensor(7, dtype=torch.int16)}
    torch.save(sd, tmp_path / "s.pt")
    index = convert(tmp_path / "s.pt", tmp_path / "out", partitions=3)
    assert sum(p.size for p in index.partitions) == 4096
    assert all(t.offset == 0 for t in index.tensors.values())
    back = read_state_dict(tmp_path / "out")
    assert back["b"].shape == (3, 0) and back["c"].shape == () and back["c"].item() == 7


def test_conversion_is_deterministic(demo_hf_dir, tmp_path):
    convert(demo_hf_dir, tmp_path / "a", 2)
    convert(demo_hf_dir, tmp_path / "b", 2)
    for name in ("ember.json", "part-00000.bin", "part-00001.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert open_checkpoint(tmp_path / "a").to_json() == json.loads((tmp_path / "a" / "ember.json").read_text())


def test_missing_tie_flag_means_tied_like_transformers(tmp_path):
    from safetensors.torch import save_file

    m = tmp_path / "m"
    m.mkdir()
    save_file({"transformer.wte.weight": torch.randn(20, 4)}, str(m / "model.safetensors"))
    (m / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert convert(m, tmp_path / "out").aliases == {"lm_head.weight": "transformer.wte.weight"}
