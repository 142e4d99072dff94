"""Property-based round trips: every dtype and edge shape, from every kind of source, bit-exact."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.ckpt_format import open_checkpoint, read_state_dict, spec
from ember.ckpt_format.writer import convert

ALL_DTYPES = list(spec.DTYPE_ITEMSIZE)
#: safetensors has no complex128.
SAFETENSORS_DTYPES = [d for d in ALL_DTYPES if d != "complex128"]

SHAPES = st.one_of(
    st.just(()),  # 0-d
    st.lists(st.integers(0, 3), min_size=1, max_size=3).filter(lambda s: 0 in s),  # empty
    st.lists(st.integers(1, 37), min_size=1, max_size=3),  # odd sizes
    st.tuples(st.integers(700, 1100), st.just(7)),  # several alignment blocks and chunks
)


def raw_tensor(dtype: str, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    """A tensor holding exactly these bytes (any bit pattern: NaNs, denormals, negative zero)."""
    dt = getattr(torch, dtype)
    n = math.prod(shape) * spec.DTYPE_ITEMSIZE[dtype]
    buf = bytearray(data[:n].ljust(n, b"\x5a"))
    if dtype == "bool":
        buf = bytearray(b & 1 for b in buf)
    if n == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dt).reshape(shape).clone()


def as_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


@st.composite
def state_dicts(draw, dtypes: list[str]) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.from_regex(r"[a-z]{1,6}(\.[a-z0-9_]{1,6}){0,3}", fullmatch=True), min_size=1, max_size=6, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(dtypes))
        shape = tuple(draw(SHAPES))
        nbytes = math.prod(shape) * spec.DTYPE_ITEMSIZE[dtype]
        seed = draw(st.binary(min_size=min(nbytes, 64), max_size=64))
        data = (seed or b"\x00") * (nbytes // max(len(seed), 1) + 1)
        out[name] = raw_tensor(dtype, shape, data)
    return out


def write_source(kind: str, tensors: dict[str, torch.Tensor], root: Path) -> Path:
    from safetensors.torch import save_file

    if kind == "single_safetensors":
        save_file(tensors, str(root / "weights.safetensors"))
        return root / "weights.safetensors"
    if kind == "torch_pt":
        torch.save(tensors, root / "state.pt")
        return root / "state.pt"
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "test", "hidden_size": 7}))
    (model / "tokenizer.json").write_text('{"fake": true}')
    if kind == "hf_bin":
        torch.save(tensors, model / "pytorch_model.bin")
        return model
    names = list(tensors)
    shards = [names[::2], names[1::2]]
    weight_map = {}
    for i, shard in enumerate(s for s in shards if s):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in shard}, str(model / file))
        weight_map.update(dict.fromkeys(shard, file))
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


def check_round_trip(kind: str, tensors: dict[str, torch.Tensor], partitions: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = write_source(kind, tensors, root)
        seen = []
        index = convert(src, root / "out", partitions, chunk_bytes=8192, progress=lambda d, t: seen.append((d, t)))
        assert index == open_checkpoint(root / "out")
        assert len(index.partitions) == partitions
        assert seen[-1][0] == seen[-1][1] == sum(as_bytes(t).__len__() for t in tensors.values())
        back = read_state_dict(root / "out")
        assert set(back) == set(tensors)
        for name, t in tensors.items():
            got = back[name]
            assert got.dtype == t.dtype, name
            assert tuple(got.shape) == tuple(t.shape), name
            assert as_bytes(got) == as_bytes(t), name
        if kind.startswith("hf"):
            assert index.config == {"model_type": "test", "hidden_size": 7}
            assert (root / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
            assert index.files == ["config.json", "tokenizer.json"]
        # padding is zeros: the partition files hold nothing but the tensors
        for p in range(partitions):
            data = bytearray(index.partition_path(p).read_bytes())
            for e in index.tensors_in_partition(p):
                data[e.offset : e.offset + e.nbytes] = bytes(e.nbytes)
            assert not any(data)


COMMON = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(tensors=state_dicts(SAFETENSORS_DTYPES), partitions=st.integers(1, 3))
def test_round_trip_hf_sharded_safetensors(tensors, partitions):
    check_round_trip("hf_sharded_safetensors", tensors, partitions)


@COMMON
@given(tensors=state_dicts(SAFETENSORS_DTYPES), partitions=st.integers(1, 3))
def test_round_trip_single_safetensors(tensors, partitions):
    check_round_trip("single_safetensors", tensors, partitions)


@COMMON
@given(tensors=state_dicts(ALL_DTYPES), partitions=st.integers(1, 3))
def test_round_trip_torch_state_dict(tensors, partitions):
    check_round_trip("torch_pt", tensors, partitions)


@COMMON
@given(tensors=state_dicts(ALL_DTYPES), partitions=st.integers(1, 3))
def test_round_trip_hf_pytorch_model_bin(tensors, partitions):
    check_round_trip("hf_bin", tensors, partitions)


@pytest.mark.parametrize("kind", ["hf_sharded_safetensors", "single_safetensors", "torch_pt", "hf_bin"])
def test_every_dtype_and_nan_payloads(kind):
    """One tensor of each dtype the source can hold, with NaN payloads and -0.0 in the float ones."""
    dtypes = ALL_DTYPES if kind in ("torch_pt", "hf_bin") else SAFETENSORS_DTYPES
    pattern = bytes([0xFF, 0x7F, 0x01, 0xC0, 0x00, 0x80, 0xFE, 0x7F] * 8)
    tensors = {f"t.{d}": raw_tensor(d, (3, 5), pattern * 4) for d in dtypes}
    tensors["scalar"] = torch.tensor(float("nan"), dtype=torch.float32)
    tensors["empty"] = torch.empty(0, 4, dtype=torch.bfloat16)
    check_round_trip(kind, tensors, 2)


def test_non_contiguous_and_conjugate_views_are_written_as_their_values(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    z = torch.randn(4, dtype=torch.complex64)
    w = torch.randn(4, dtype=torch.complex64)
    tensors = {"t": base.t(), "slice": base[1:3, ::2], "conj": z.conj(), "neg": w.conj().imag}
    torch.save(tensors, tmp_path / "s.pt")
    convert(tmp_path / "s.pt", tmp_path / "out")
    back = read_state_dict(tmp_path / "out")
    for name, t in tensors.items():
        assert torch.equal(back[name], t.resolve_conj().resolve_neg()), name
