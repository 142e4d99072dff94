"""Bad input: every error names the file (and chunk) and says what to do."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from ember.ckpt_format import CheckpointError, convert, open_checkpoint, read_state_dict
from ember.ckpt_format.checksum import verify_chunk
from ember.ckpt_format.errors import (
    CorruptChunkError,
    DestinationExistsError,
    InvalidIndexError,
    PartitionSizeError,
    SourceError,
    UnsupportedDtypeError,
)
from ember.ckpt_format.writer import convert as write


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A checkpoint with two 4-chunk partitions (chunk 8 KiB) and an alias."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(64, 128, generator=g)
    tensors = {"embed": emb, "head": emb, "w": torch.randn(64, 128, generator=g), "b": torch.randn(7, generator=g)}
    torch.save(tensors, tmp_path / "s.pt")
    write(tmp_path / "s.pt", tmp_path / "ckpt", 2, chunk_bytes=8192)
    return tmp_path / "ckpt"


def edit_index(ckpt: Path, fn) -> Path:
    doc = json.loads((ckpt / "ember.json").read_text())
    fn(doc)
    (ckpt / "ember.json").write_text(json.dumps(doc))
    return ckpt


def assert_refused(ckpt: Path, *fragments: str, exc: type[CheckpointError] = InvalidIndexError) -> CheckpointError:
    with pytest.raises(exc) as info:
        open_checkpoint(ckpt)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, (f, msg)
    assert info.value.hint
    return info.value


# ---- sources ----


def test_missing_source(tmp_path):
    with pytest.raises(SourceError, match=r"conversion source not found: .*nope") as info:
        convert(tmp_path / "nope", tmp_path / "out")
    assert "directory" in info.value.hint
    assert not (tmp_path / "out").exists()


def test_unknown_source_kind(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(SourceError, match=r"unknown conversion source .*weights.npz.*\.npz"):
        convert(tmp_path / "weights.npz", tmp_path / "out")


def test_directory_without_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(SourceError, match=r"no model weights in .*m: expected model.safetensors.*found adapter.safetensors"):
        convert(tmp_path / "m", tmp_path / "out")


def test_index_lists_missing_shard(tmp_path):
    from safetensors.torch import save_file

    m = tmp_path / "m"
    m.mkdir()
    save_file({"a": torch.ones(2)}, str(m / "model-00001-of-00002.safetensors"))
    (m / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(SourceError, match=r"lists shard model-00002-of-00002.safetensors, which is missing") as info:
        convert(m, tmp_path / "out")
    assert "incomplete" in info.value.hint


def test_shard_name_escaping_model_dir(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(SourceError, match=r"names shard '../x.safetensors'"):
        convert(m, tmp_path / "out")


def test_malformed_config_json(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    torch.save({"a": torch.ones(2)}, m / "pytorch_model.bin")
    (m / "config.json").write_text("{not json")
    with pytest.raises(SourceError, match=r"config.json is not valid JSON"):
        convert(m, tmp_path / "out")


def test_unsupported_dtype_torch(tmp_path):
    torch.save({"ok": torch.ones(2), "q": torch.zeros(3, dtype=torch.float8_e4m3fnuz)}, tmp_path / "s.pt")
    with pytest.raises(UnsupportedDtypeError, match=r"tensor 'q' in .*s.pt has dtype float8_e4m3fnuz, which Ember format v1 cannot store") as info:
        convert(tmp_path / "s.pt", tmp_path / "out")
    assert "bfloat16" in info.value.hint
    assert not (tmp_path / "out").exists()


def test_unsupported_dtype_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"q": torch.zeros(3, dtype=torch.float8_e5m2fnuz)}, str(tmp_path / "s.safetensors"))
    with pytest.raises(UnsupportedDtypeError, match=r"tensor 'q' in .*s.safetensors has dtype F8_E5M2FNUZ"):
        convert(tmp_path / "s.safetensors", tmp_path / "out")


def test_truncated_safetensors_source(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(100)}, str(tmp_path / "s.safetensors"))
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(data[:-10])
    with pytest.raises(SourceError, match=r"s.safetensors: tensor 'a' .* runs past the end of the file"):
        convert(tmp_path / "s.safetensors", tmp_path / "out")
    (tmp_path / "s.safetensors").write_bytes(struct.pack("<Q", 10**9))
    with pytest.raises(SourceError, match=r"s.safetensors is not a safetensors file"):
        convert(tmp_path / "s.safetensors", tmp_path / "out")


def test_torch_file_with_non_tensor_values(tmp_path):
    torch.save({"model": {"a": torch.ones(1)}, "epoch": 3}, tmp_path / "s.pt")
    with pytest.raises(SourceError, match=r"entry 'model' is a dict, not a tensor") as info:
        convert(tmp_path / "s.pt", tmp_path / "out")
    assert "state_dict()" in info.value.hint
    (tmp_path / "junk.bin").write_bytes(b"this is not a torch file")
    with pytest.raises(SourceError, match=r"cannot read .*junk.bin as a torch state dict"):
        convert(tmp_path / "junk.bin", tmp_path / "out")


def test_bad_partitions_argument(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="partitions must be a positive integer"):
        convert(tmp_path / "s.pt", tmp_path / "out", 0)


# ---- destination ----


def test_destination_exists_refused_unless_overwrite(tmp_path, ckpt):
    torch.save({"new": torch.ones(3)}, tmp_path / "n.pt")
    with pytest.raises(DestinationExistsError, match=r"destination .*ckpt already exists") as info:
        convert(tmp_path / "n.pt", ckpt)
    assert "--overwrite" in info.value.hint
    assert "embed" in open_checkpoint(ckpt).tensors  # untouched
    index = convert(tmp_path / "n.pt", ckpt, overwrite=True)
    assert list(index.tensors) == ["new"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["ember.json", "part-00000.bin"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ember-tmp")] == []


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "s.pt")
    home = tmp_path / "precious"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(DestinationExistsError, match=r"precious exists and is not an Ember checkpoint"):
        convert(tmp_path / "s.pt", home, overwrite=True)
    assert (home / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationExistsError, match=r"file exists and is not a directory"):
        convert(tmp_path / "s.pt", tmp_path / "file", overwrite=True)


# ---- reading: sizes, checksums ----


def test_truncated_partition_refused_at_open(ckpt):
    part = ckpt / "part-00001.bin"
    size = part.stat().st_size
    with open(part, "r+b") as f:
        f.truncate(size - 4096)
    err = assert_refused(ckpt, "part-00001.bin is truncated", f"{size - 4096} bytes on disk, {size} in ember.json", exc=PartitionSizeError)
    assert err.file == part
    assert "ember convert" in err.hint


def test_extended_or_missing_partition_refused(ckpt):
    with open(ckpt / "part-00000.bin", "ab") as f:
        f.write(b"\0")
    assert_refused(ckpt, "part-00000.bin is longer than expected", exc=PartitionSizeError)
    (ckpt / "part-00000.bin").unlink()
    assert_refused(ckpt, "part-00000.bin is missing", exc=PartitionSizeError)


def test_flipped_byte_named_by_file_and_chunk(ckpt):
    index = open_checkpoint(ckpt)
    entry = index.tensors["w"]
    pos = entry.offset + 8192 + 5  # inside chunk 1 of the tensor's partition
    part = index.partition_path(entry.partition)
    data = bytearray(part.read_bytes())
    chunk = pos // 8192
    data[pos] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(CorruptChunkError) as info:
        read_state_dict(ckpt)
    err = info.value
    assert err.file == part and err.chunk == chunk
    assert f"{part}: checksum mismatch in chunk {chunk} (bytes {chunk * 8192}..{(chunk + 1) * 8192})" in str(err)
    assert "re-run `ember convert`" in err.hint
    read_state_dict(ckpt, verify=False)  # unverified reads still work (and return the flipped bit)


def test_verify_chunk_rejects_wrong_length(ckpt):
    index = open_checkpoint(ckpt)
    data = index.partition_path(0).read_bytes()
    verify_chunk(index, 0, 0, memoryview(data)[:8192])
    with pytest.raises(CorruptChunkError, match=r"chunk 0 \(bytes 0..8192\) is 100 bytes long"):
        verify_chunk(index, 0, 0, memoryview(data)[:100])


# ---- index validation ----


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(InvalidIndexError, match=r"checkpoint not found"):
        open_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidIndexError, match=r"empty is not an Ember checkpoint: ember.json is missing"):
        open_checkpoint(tmp_path / "empty")


def test_malformed_index_json(ckpt):
    (ckpt / "ember.json").write_text('{"format": "ember-checkpoint", "version": 1,')
    assert_refused(ckpt, "ember.json is not valid JSON", "line 1")


def test_foreign_json(ckpt):
    (ckpt / "ember.json").write_text('{"format": "something-else"}')
    assert_refused(ckpt, "is not an Ember checkpoint index", "'something-else'")


def test_future_version_refused(ckpt):
    edit_index(ckpt, lambda d: d.update(version=2, shiny_new_field=True))
    err = assert_refused(ckpt, "ember.json has format version 2, written by a newer Ember")
    assert "upgrade" in err.hint


def test_unknown_keys_ignored(ckpt):
    edit_index(ckpt, lambda d: d.update(comment="hello"))
    open_checkpoint(ckpt)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "..", ".", "a/b", "a\\b", "", "C:x"])
def test_path_escaping_partition_name_refused(ckpt, bad):
    edit_index(ckpt, lambda d: d["partitions"][1].update(file=bad))
    assert_refused(ckpt, f"partitions[1] has file name {bad!r}", "not a plain file name")


def test_path_escaping_copied_file_refused(ckpt):
    edit_index(ckpt, lambda d: d.update(files=["../x"]))
    assert_refused(ckpt, "\"files\" has file name '../x'")


def _set_tensor(name, **kw):
    return lambda d: d["tensors"][name].update(kw)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.update(version="1"), '"version" must be an integer'),
        (lambda d: d.update(version=True), '"version" must be an integer'),
        (lambda d: d.update(alignment=6144), '"alignment" must be a power of two'),
        (lambda d: d.update(alignment=2048), '"alignment" must be at least 4096'),
        (lambda d: d.update(chunk_bytes=8192 + 4096 * 3 // 2), '"chunk_bytes" (14336) must be a multiple'),
        (lambda d: d.update(checksum="md5"), "uses checksum 'md5'"),
        (lambda d: d.update(config=[1]), '"config" must be a JSON object or null'),
        (lambda d: d["partitions"][0].update(size=d["partitions"][0]["size"] + 1), "is not a multiple of \"alignment\""),
        (lambda d: d["partitions"][0]["checksums"].pop(), "checksums, expected"),
        (lambda d: d["partitions"][0]["checksums"].__setitem__(0, "XYZ"), "is not 16 lowercase hex digits"),
        (lambda d: d["partitions"].__setitem__(1, dict(d["partitions"][0])), "is used by two partitions"),
        (_set_tensor("w", dtype="float4"), "unknown dtype 'float4'"),
        (_set_tensor("w", shape=[64, -128]), '"shape" must be a list of non-negative integers'),
        (_set_tensor("w", nbytes=12), '"nbytes" is 12'),
        (_set_tensor("w", offset=100), '"offset" 100 is not a multiple'),
        (_set_tensor("w", partition=7), '"partition" 7 does not exist'),
        (_set_tensor("w", offset=1 << 30), "run past the end of part-0000"),
        (lambda d: d["aliases"].update(head="nothing"), "alias 'head' points to 'nothing'"),
        (lambda d: d["aliases"].update(w="embed"), "alias 'w' is also a tensor name"),
    ],
)
def test_index_rules(ckpt, mutate, fragment):
    edit_index(ckpt, mutate)
    assert_refused(ckpt, "ember.json", fragment)


def test_overlapping_tensors_refused(ckpt):
    def overlap(d):
        w, e = d["tensors"]["w"], d["tensors"]["embed"]
        w.update(partition=e["partition"], offset=e["offset"])

    edit_index(ckpt, overlap)
    assert_refused(ckpt, "overlap in part-0000")


def test_index_without_partitions_on_disk_can_be_parsed(ckpt, tmp_path):
    only_index = tmp_path / "only-index"
    only_index.mkdir()
    shutil.copy(ckpt / "ember.json", only_index)
    assert open_checkpoint(only_index, check_files=False).tensors.keys() == open_checkpoint(ckpt).tensors.keys()
    assert_refused(only_index, "part-00000.bin is missing", exc=PartitionSizeError)
