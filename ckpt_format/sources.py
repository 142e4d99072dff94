"""Conversion sources: find the weight files of a model and stream each tensor's raw bytes.

Two readers, both streaming tensor by tensor so memory stays bounded:
- safetensors files are parsed here (8-byte header length, JSON header, raw little-endian
  bytes) and copied block by block — no torch needed and bit-exact by construction;
- torch state-dict files go through `torch.load(mmap=True, weights_only=True)`, so a tensor's
  pages are read only when its bytes are written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.ckpt_format import spec
from ember.ckpt_format.errors import SourceError, UnsupportedDtypeError

#: Block size for streaming tensor bytes: bounds memory for safetensors copies and sets the
#: granularity of progress reports.
COPY_BLOCK = 16 << 20

SAFETENSORS_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}

TORCH_SUFFIXES = (".pt", ".pth", ".bin")

#: Files copied byte for byte from a model directory: config, generation defaults, tokenizer.
COPIED_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
    }
)
COPIED_SUFFIXES = (".jinja", ".tiktoken")

#: Where Hugging Face models keep the input embedding that `tie_word_embeddings` ties
#: lm_head.weight to.
INPUT_EMBEDDING_NAMES = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "transformer.wte.weight",
    "transformer.word_embeddings.weight",
    "model.decoder.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "embed_tokens.weight",
)

DTYPE_HINT = "cast the tensor to a supported dtype before converting (e.g. tensor.to(torch.bfloat16))"


@dataclass
class SourceTensor:
    """One tensor of the source: its metadata and how to stream its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path
    #: safetensors: absolute byte offset of the data in `file`; torch: unused.
    file_offset: int = 0
    #: torch: the tensor itself (mmap-backed); safetensors: None.
    tensor: Any = None

    def blocks(self) -> Iterator[memoryview]:
        """The tensor's C-contiguous little-endian bytes in blocks of at most COPY_BLOCK."""
        if self.nbytes == 0:
            return
        if self.tensor is None:
            yield from _file_blocks(self.file, self.file_offset, self.nbytes)
        else:
            yield from _tensor_blocks(self.tensor, self.nbytes)


@dataclass
class Source:
    """Everything a conversion reads: tensors in source order, shared names, copied files."""

    path: Path
    tensors: list[SourceTensor]
    aliases: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    config: dict[str, Any] | None = None
    generation_config: dict[str, Any] | None = None


def open_source(src: str | os.PathLike[str]) -> Source:
    """Recognise the kind of source at `src` and read its metadata (no tensor data yet)."""
    path = Path(src)
    if not path.exists():
        raise SourceError(
            f"conversion source not found: {path}",
            "pass a Hugging Face model directory, a .safetensors file or a torch state-dict "
            "file (.pt/.pth/.bin)",
        )
    if path.is_dir():
        return _open_model_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, meta = read_safetensors_header(path)
        return Source(path, tensors, aliases=_metadata_aliases(meta, tensors))
    if suffix in TORCH_SUFFIXES:
        tensors, aliases = read_torch_file(path)
        return Source(path, tensors, aliases=aliases)
    raise SourceError(
        f"unknown conversion source {path}: expected a directory, a .safetensors file or a "
        f"torch state-dict file (.pt, .pth, .bin), not {suffix or 'a file without suffix'}",
        "point `ember convert` at the model directory or at its weights file",
    )


def _open_model_dir(path: Path) -> Source:
    weights = _weight_files(path)
    tensors: list[SourceTensor] = []
    aliases: dict[str, str] = {}
    for file in weights:
        if file.suffix == ".safetensors":
            found, meta = read_safetensors_header(file)
            file_aliases = _metadata_aliases(meta, found)
        else:
            found, file_aliases = read_torch_file(file)
        tensors += found
        aliases.update(file_aliases)
    seen: dict[str, Path] = {}
    for t in tensors:
        if t.name in seen:
            raise SourceError(
                f"tensor {t.name!r} appears in both {seen[t.name]} and {t.file}",
                "the model directory mixes two checkpoints; remove the stale weight files",
            )
        seen[t.name] = t.file
    aliases = {a: tgt for a, tgt in aliases.items() if a not in seen}
    config = _read_json(path / "config.json")
    generation_config = _read_json(path / "generation_config.json")
    # A HF causal LM without lm_head.weight in its weights ties it to the input embedding
    # (`tie_word_embeddings` defaults to true in transformers when config.json omits it).
    if config is not None and config.get("tie_word_embeddings", True) is not False and "lm_head.weight" not in seen:
        for candidate in INPUT_EMBEDDING_NAMES:
            if candidate in seen:
                aliases.setdefault("lm_head.weight", candidate)
                break
    files = sorted(
        (
            f
            for f in path.iterdir()
            if f.is_file() and (f.name in COPIED_NAMES or f.name.endswith(COPIED_SUFFIXES))
        ),
        key=lambda f: f.name,
    )
    return Source(path, tensors, aliases, files, config, generation_config)


def _weight_files(path: Path) -> list[Path]:
    """The weight files of a HF model directory, in the order their index lists them."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index_file = path / index_name
        if index_file.is_file():
            doc = _read_json(index_file)
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise SourceError(
                    f"{index_file} has no valid \"weight_map\" (tensor name -> shard file)",
                    "re-download the model, or convert its weight files one by one",
                )
            shards: list[Path] = []
            for shard in dict.fromkeys(weight_map.values()):
                if not spec.is_plain_name(shard):
                    raise SourceError(
                        f"{index_file} names shard {shard!r}, which is not a file in {path}",
                        "re-download the model; its index is damaged",
                    )
                file = path / shard
                if not file.is_file():
                    raise SourceError(
                        f"{index_file} lists shard {shard}, which is missing from {path}",
                        "the download is incomplete: fetch the missing shard and convert again",
                    )
                shards.append(file)
            return shards
        if (path / single).is_file():
            return [path / single]
    found = sorted(f.name for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    extra = f" (found {', '.join(found[:5])})" if found else ""
    raise SourceError(
        f"no model weights in {path}: expected model.safetensors, model.safetensors.index.json, "
        f"pytorch_model.bin or pytorch_model.bin.index.json{extra}",
        "point `ember convert` at a Hugging Face model directory, or directly at a weights file",
    )


def read_safetensors_header(path: Path) -> tuple[list[SourceTensor], dict[str, str]]:
    """Tensors and `__metadata__` of a safetensors file, checked against the file's size."""
    bad = "re-download or re-save the file; it is not a complete safetensors file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(f"{path} is not a safetensors file: it is only {size} bytes long", bad)
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise SourceError(f"{path} is not a safetensors file: header length {n} does not fit the file", bad)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{path} is not a safetensors file: its header is not JSON ({exc})", bad) from exc
    if not isinstance(header, dict):
        raise SourceError(f"{path} is not a safetensors file: its header is not a JSON object", bad)
    data_start = 8 + n
    meta = header.pop("__metadata__", None) or {}
    tensors: list[SourceTensor] = []
    for name, info in header.items():
        try:
            st_dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"{path}: tensor {name!r} has a malformed header entry", bad) from exc
        dtype = SAFETENSORS_DTYPES.get(st_dtype)
        if dtype is None:
            raise UnsupportedDtypeError(
                f"tensor {name!r} in {path} has dtype {st_dtype}, which Ember format "
                f"v{spec.FORMAT_VERSION} cannot store (supported: {', '.join(spec.DTYPE_ITEMSIZE)})",
                DTYPE_HINT,
            )
        nbytes = math.prod(shape) * spec.DTYPE_ITEMSIZE[dtype]
        if end - begin != nbytes or begin < 0 or data_start + end > size:
            raise SourceError(
                f"{path}: tensor {name!r} ({st_dtype} {list(shape)}) has byte range {begin}..{end}, "
                f"which does not match its size or runs past the end of the file",
                bad,
            )
        tensors.append(SourceTensor(name, dtype, shape, nbytes, path, file_offset=data_start + begin))
    tensors.sort(key=lambda t: t.file_offset)
    return tensors, {k: v for k, v in meta.items() if isinstance(v, str)}


def _metadata_aliases(meta: dict[str, str], tensors: list[SourceTensor]) -> dict[str, str]:
    """Names that `safetensors.torch.save_model` dropped as shared, recorded as removed -> kept."""
    names = {t.name for t in tensors}
    return {k: v for k, v in meta.items() if v in names and k not in names}


def read_torch_file(path: Path) -> tuple[list[SourceTensor], dict[str, str]]:
    """Tensors of a torch state-dict file; names sharing one storage view become aliases."""
    import torch

    from ember.ckpt_format.dtypes import dtype_name

    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files in torch's legacy (pre-zip) serialization cannot be mapped; read them whole.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler fails in many ways on foreign or damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(
            f"cannot read {path} as a torch state dict: {first}",
            "save weights with torch.save(model.state_dict(), path); files holding pickled "
            "objects other than tensors are refused for safety",
        ) from exc
    if not isinstance(obj, dict):
        raise SourceError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensor name -> tensor)",
            "save weights with torch.save(model.state_dict(), path)",
        )
    tensors: list[SourceTensor] = []
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    for name, t in obj.items():
        if not isinstance(name, str) or not name:
            raise SourceError(f"{path} has a key {name!r} that is not a tensor name", "use string keys")
        if not isinstance(t, torch.Tensor):
            raise SourceError(
                f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor",
                "save only the weights: torch.save(model.state_dict(), path)",
            )
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise SourceError(
                f"{path}: tensor {name!r} is not a dense tensor with data ({t.layout}, {t.device})",
                "convert it to a dense tensor (tensor.to_dense()) before saving",
            )
        dtype = dtype_name(t.dtype)
        if dtype is None:
            raise UnsupportedDtypeError(
                f"tensor {name!r} in {path} has dtype {str(t.dtype).removeprefix('torch.')}, which Ember "
                f"format v{spec.FORMAT_VERSION} cannot store (supported: {', '.join(spec.DTYPE_ITEMSIZE)})",
                DTYPE_HINT,
            )
        nbytes = t.numel() * t.element_size()
        storage = t.untyped_storage()
        if nbytes and storage.data_ptr():
            key = (storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in by_view:
                aliases[name] = by_view[key]
                continue
            by_view[key] = name
        tensors.append(SourceTensor(name, dtype, tuple(t.shape), nbytes, path, tensor=t))
    return tensors, aliases


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path} is not valid JSON: {exc}", f"fix or re-download {path.name}") from exc
    if not isinstance(doc, dict):
        raise SourceError(f"{path} must hold a JSON object", f"fix or re-download {path.name}")
    return doc


def _file_blocks(file: Path, offset: int, nbytes: int) -> Iterator[memoryview]:
    buf = bytearray(min(COPY_BLOCK, nbytes))
    view = memoryview(buf)
    with open(file, "rb", buffering=0) as f:
        f.seek(offset)
        left = nbytes
        while left:
            n = f.readinto(view[: min(left, len(buf))])
            if not n:
                raise SourceError(
                    f"{file} ended while reading tensor data at byte {offset + nbytes - left}",
                    "the file was truncated or is being written; re-download it",
                )
            yield view[:n]
            left -= n


def _tensor_blocks(t, nbytes: int) -> Iterator[memoryview]:
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(_uint8())
    data = memoryview(flat.numpy())
    for start in range(0, nbytes, COPY_BLOCK):
        yield data[start : start + COPY_BLOCK]


def _uint8():
    import torch

    return torch.uint8
