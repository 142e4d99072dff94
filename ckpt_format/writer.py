"""The writer: convert a model into an Ember checkpoint, atomically.

Everything is written into a temporary directory beside the destination (same filesystem, so
the final rename is atomic), fsynced, and renamed into place only when complete: a reader can
never see a half-written checkpoint, and a conversion killed half-way leaves nothing at the
destination. Temporary directories of dead conversions are removed by the next conversion to
the same destination.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import xxhash

from ember.ckpt_format import spec
from ember.ckpt_format.errors import CheckpointError, DestinationExistsError
from ember.ckpt_format.index import CheckpointIndex, PartitionEntry, TensorEntry, open_checkpoint
from ember.ckpt_format.layout import plan_layout
from ember.ckpt_format.sources import Source, SourceTensor, open_source

Progress = Callable[[int, int], None]


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    partitions: int = 1,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    alignment: int = spec.DEFAULT_ALIGNMENT,
    chunk_bytes: int = spec.DEFAULT_CHUNK_BYTES,
) -> CheckpointIndex:
    """Convert `src` into an Ember checkpoint directory at `dst` and return its index.

    `src` is a Hugging Face model directory (sharded or single safetensors or pytorch_model
    .bin, with or without an index), a .safetensors file, or a torch state-dict file
    (.pt/.pth/.bin). Tensors are streamed one at a time, so memory stays near the largest
    tensor (a 16 MiB block for safetensors sources). `partitions` splits the bytes into that
    many files balanced by size (one per tensor-parallel rank, or to spread reads over disks).
    An existing `dst` is refused unless `overwrite`, and even then only if it is an Ember
    checkpoint or an empty directory. `progress(bytes_done, bytes_total)` is called as tensor
    bytes are written.
    """
    if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
        raise CheckpointError(f"partitions must be a positive integer, got {partitions!r}", "pass --partitions 1 or more")
    if alignment < spec.MIN_ALIGNMENT or alignment & (alignment - 1):
        raise CheckpointError(f"alignment must be a power of two >= {spec.MIN_ALIGNMENT}, got {alignment}")
    if chunk_bytes < alignment or chunk_bytes % alignment:
        raise CheckpointError(f"chunk_bytes must be a positive multiple of alignment, got {chunk_bytes}")
    dst = Path(dst).absolute()
    _check_destination(dst, overwrite)
    source = open_source(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temp_dirs(dst)
    tmp = dst.parent / f"{_temp_stem(dst)}.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_checkpoint(source, tmp, partitions, alignment, chunk_bytes, progress)
        _move_into_place(tmp, dst, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return open_checkpoint(dst)


def _write_checkpoint(
    source: Source, tmp: Path, partitions: int, alignment: int, chunk_bytes: int, progress: Progress | None
) -> None:
    by_name = {t.name: t for t in source.tensors}
    placements, part_sizes = plan_layout({t.name: t.nbytes for t in source.tensors}, partitions, alignment)
    total = sum(t.nbytes for t in source.tensors)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    part_entries: list[PartitionEntry] = []
    for p, size in enumerate(part_sizes):
        members = sorted((n for n, pl in placements.items() if pl.partition == p), key=lambda n: placements[n].offset)
        file = spec.partition_file_name(p)
        with _ChunkedWriter(tmp / file, chunk_bytes) as w:
            for name in members:
                w.pad_to(placements[name].offset)
                _copy_tensor(by_name[name], w, advance)
            w.pad_to(size)
            part_entries.append(PartitionEntry(file, size, w.digests))

    files = []
    for f in source.files:
        shutil.copyfile(f, tmp / f.name)
        _fsync_file(tmp / f.name)
        files.append(f.name)

    tensors = {
        name: TensorEntry(name, t.dtype, t.shape, placements[name].partition, placements[name].offset, t.nbytes)
        for name, t in sorted(by_name.items(), key=lambda kv: (placements[kv[0]].partition, placements[kv[0]].offset, kv[0]))
    }
    aliases = _resolve_aliases(source.aliases, tensors)
    index = CheckpointIndex(
        path=tmp,
        version=spec.FORMAT_VERSION,
        alignment=alignment,
        chunk_bytes=chunk_bytes,
        checksum=spec.CHECKSUM,
        config=source.config,
        generation_config=source.generation_config,
        files=files,
        partitions=part_entries,
        tensors=tensors,
        aliases=aliases,
    )
    index_path = tmp / spec.INDEX_FILE
    index_path.write_text(dumps_index(index), encoding="utf-8")
    _fsync_file(index_path)
    _fsync_dir(tmp)


def dumps_index(index: CheckpointIndex) -> str:
    """ember.json text: indented at the top, one line per partition, tensor and alias, so the
    index of a thousand-tensor model stays readable with `less`."""
    doc = index.to_json()
    out = []
    for key, value in doc.items():
        if key in ("partitions", "tensors", "aliases") and value:
            if isinstance(value, list):
                rows = [json.dumps(v, ensure_ascii=False) for v in value]
                body = "[\n  " + ",\n  ".join(rows) + "\n ]"
            else:
                rows = [f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}" for k, v in value.items()]
                body = "{\n  " + ",\n  ".join(rows) + "\n }"
        else:
            body = json.dumps(value, ensure_ascii=False, indent=1).replace("\n", "\n ")
        out.append(f" {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(out) + "\n}\n"


def _copy_tensor(t: SourceTensor, w: _ChunkedWriter, advance: Callable[[int], None]) -> None:
    written = 0
    for block in t.blocks():
        w.write(block)
        written += len(block)
        advance(len(block))
    if written != t.nbytes:
        raise CheckpointError(
            f"tensor {t.name!r} from {t.file}: read {written} bytes, expected {t.nbytes}",
            "the source file changed during conversion; convert again",
        )


def _resolve_aliases(aliases: dict[str, str], tensors: dict[str, TensorEntry]) -> dict[str, str]:
    """Follow alias chains to a stored tensor; drop aliases whose target is not stored."""
    out: dict[str, str] = {}
    for alias in sorted(aliases):
        target, seen = aliases[alias], {alias}
        while target in aliases and target not in seen:
            seen.add(target)
            target = aliases[target]
        if target in tensors and alias not in tensors:
            out[alias] = target
    return out


class _ChunkedWriter:
    """Writes a partition file sequentially and computes one xxh3-64 per chunk on the way."""

    _ZEROS = memoryview(bytes(1 << 20))

    def __init__(self, path: Path, chunk_bytes: int) -> None:
        self.f = open(path, "wb", buffering=0)
        self.chunk_bytes = chunk_bytes
        self.pos = 0
        self.hasher = xxhash.xxh3_64()
        self.in_chunk = 0
        self.digests: list[str] = []

    def write(self, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        view = data
        while view.nbytes:
            n = self.f.write(view)
            view = view[n:]
        self.pos += data.nbytes
        while data.nbytes:
            take = min(self.chunk_bytes - self.in_chunk, data.nbytes)
            self.hasher.update(data[:take])
            self.in_chunk += take
            data = data[take:]
            if self.in_chunk == self.chunk_bytes:
                self._close_chunk()

    def pad_to(self, offset: int) -> None:
        if offset < self.pos:
            raise AssertionError(f"layout overlap: writing at {offset} after {self.pos}")
        while self.pos < offset:
            self.write(self._ZEROS[: min(offset - self.pos, len(self._ZEROS))])

    def _close_chunk(self) -> None:
        self.digests.append(self.hasher.hexdigest())
        self.hasher.reset()
        self.in_chunk = 0

    def __enter__(self) -> _ChunkedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self.in_chunk:
                    self._close_chunk()
                os.fsync(self.f.fileno())
        finally:
            self.f.close()


def _check_destination(dst: Path, overwrite: bool) -> None:
    if not dst.exists() and not dst.is_symlink():
        return
    if not overwrite:
        raise DestinationExistsError(
            f"destination {dst} already exists",
            "choose another destination, or pass --overwrite (overwrite=True) to replace it",
        )
    if dst.is_symlink() or not dst.is_dir():
        raise DestinationExistsError(
            f"destination {dst} exists and is not a directory; refusing to replace it",
            "remove it yourself or choose another destination",
        )
    if not (dst / spec.INDEX_FILE).is_file() and any(dst.iterdir()):
        raise DestinationExistsError(
            f"destination {dst} exists and is not an Ember checkpoint (no {spec.INDEX_FILE}); "
            "refusing to replace it even with overwrite",
            "choose another destination, or remove the directory yourself",
        )


def _move_into_place(tmp: Path, dst: Path, overwrite: bool) -> None:
    old = None
    if dst.exists():
        _check_destination(dst, overwrite)  # it may have appeared while we converted
        old = tmp.with_name(tmp.name + ".old")
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except OSError:
        if old is not None:
            os.rename(old, dst)
        raise
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _temp_stem(dst: Path) -> str:
    """Temp dirs carry the host and pid so a later conversion can tell dead ones from live ones."""
    return f"{spec.TEMP_PREFIX}{dst.name}.{socket.gethostname()}"


def _remove_dead_temp_dirs(dst: Path) -> None:
    """Delete temp dirs left by conversions to `dst` that were killed (SIGKILL, power loss)."""
    stem = _temp_stem(dst) + "."
    for entry in dst.parent.iterdir():
        if not entry.name.startswith(stem):
            continue
        pid_text = entry.name[len(stem) :].split(".", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
