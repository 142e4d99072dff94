"""load_model: a ready-to-run transformers model from an Ember checkpoint, with no random init.

The model is built on the meta device (no memory, no initialisation), the loaded tensors are
assigned as its parameters (`load_state_dict(assign=True)`: the fast loader's views become the
weights, nothing is copied), tied weights are re-tied, and the non-persistent buffers that are
not in any checkpoint are computed on the target device.

Non-persistent buffers (rotary `inv_freq`, `original_inv_freq`, ...): built on meta they have
no values. transformers 5 computes them in `_init_weights` (e.g. the rope init function for
every *RotaryEmbedding) and from_pretrained runs that after loading, with every loaded tensor
flagged `_is_hf_initialized` so its init functions skip them. We do exactly the same, so the
buffers are bit-identical to from_pretrained's and no weight is ever initialised. The buffers are
first filled with a sentinel, and one the library left untouched is recomputed from the module's
own rope function (transformers 4.x keeps `rope_init_fn` on the module) or reported as an error
rather than left as garbage.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from ember.ckpt_format.index import open_checkpoint

from .errors import LoaderError
from .pool import DramPool
from .state_dict import load_state_dict, resolve_device
from .stats import BandwidthTracker, last_load_stats
from .tp import ShardPlan

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ember.loader")


def load_model(
    path: str | os.PathLike[str],
    device: str | Any = "cpu",
    *,
    pool: DramPool | None = None,
    dtype: Any = None,
    threads: int | None = None,
    chunk_mb: float | None = None,
    verify: bool = True,
    tp_rank: int = 0,
    tp_size: int = 1,
    shard_plan: ShardPlan | None = None,
    tracker: BandwidthTracker | None = None,
) -> torch.nn.Module:
    """An eval-mode AutoModelForCausalLM for the checkpoint at `path`, its weights on `device`.

    dtype: cast floating-point weights (a copy); by default they keep the checkpoint's dtype.
    Other options are load_state_dict's. On CPU with a pool the weights share the pool's memory
    and are read-only by contract (see ember.loader.pool).
    """
    import torch

    if tp_size != 1:
        raise LoaderError(
            f"load_model builds a whole transformers model; one rank's slice (tp_size={tp_size}) does not fit it",
            "use load_state_dict(path, tp_rank=..., tp_size=...) with a tensor-parallel backend",
        )
    index = open_checkpoint(path)
    if index.config is None:
        raise LoaderError(
            f"{index.path} has no model config (its source had no config.json)",
            "convert from a Hugging Face model directory, or use load_state_dict for the tensors",
        )
    target = resolve_device(device)
    build_dtype = _resolve_dtype(dtype, index.config, index)
    config = _config(index.config)
    model = _build_on_meta(config, build_dtype)

    state = load_state_dict(
        path,
        target,
        threads=threads,
        chunk_mb=chunk_mb,
        verify=verify,
        shard_plan=shard_plan,
        pool=pool,
        tracker=tracker,
    )
    if dtype is not None:
        state = _cast(state, build_dtype)

    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        log.info("%s: ignoring tensors the model does not use: %s", index.path, ", ".join(result.unexpected_keys[:8]))
    model.tie_weights()
    still_meta = [n for n, t in [*model.named_parameters(), *_persistent_buffers(model)] if t.is_meta]
    if still_meta:
        raise LoaderError(
            f"{index.path} lacks weights the model needs: {', '.join(still_meta[:8])}"
            + (" ..." if len(still_meta) > 8 else ""),
            "the checkpoint does not match its config; re-convert it from the original model",
        )
    _materialize_buffers(model, target)
    if index.generation_config:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_dict(dict(index.generation_config))
    model.eval()
    # The worker runs loads in a thread pool, where last_load_stats() is the pool thread's: the
    # model carries its own load's stats.
    model.ember_load_stats = last_load_stats()
    return model


def _resolve_dtype(dtype: Any, config: dict, index) -> Any:
    import torch

    if dtype is not None:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise LoaderError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
        return dtype
    stored = config.get("dtype") or config.get("torch_dtype")
    if isinstance(stored, str) and isinstance(getattr(torch, stored.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, stored.removeprefix("torch."))
    from ember.ckpt_format.dtypes import to_torch

    for entry in index.tensors.values():  # no dtype in the config: the weights' own
        dt = to_torch(entry.dtype)
        if dt.is_floating_point:
            return dt
    return torch.float32


def _config(raw: dict) -> Any:
    import transformers
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if not model_type:
        raise LoaderError("the checkpoint's config has no model_type", "re-convert from a Hugging Face model directory")
    if model_type not in CONFIG_MAPPING:
        raise LoaderError(
            f"model type {model_type!r} is not known to transformers {transformers.__version__}",
            "upgrade transformers (pip install -U transformers)",
        )
    return CONFIG_MAPPING[model_type].from_dict(dict(raw))


def _build_on_meta(config: Any, dtype: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    try:
        with torch.device("meta"), no_init_weights():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise LoaderError(
            f"cannot build a causal language model from this config: {exc}",
            "load_model supports models AutoModelForCausalLM knows; use load_state_dict otherwise",
        ) from exc


def _cast(state: dict[str, Any], dtype: Any) -> dict[str, Any]:
    cast: dict[int, Any] = {}
    out = {}
    for name, t in state.items():
        if id(t) not in cast:
            cast[id(t)] = t.to(dtype) if t.is_floating_point() else t
        out[name] = cast[id(t)]
    return out


def _persistent_buffers(model: Any):
    for mod_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


def _sentinel(t: Any) -> Any:
    import torch

    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(False)
    return t.fill_(torch.iinfo(t.dtype).min)


def _is_sentinel(t: Any) -> bool:
    import torch

    if t.numel() == 0:
        return False
    if t.is_floating_point() or t.is_complex():
        return bool(torch.isnan(t).all())
    if t.dtype == torch.bool:
        return False  # a bool buffer cannot hold a distinguishable sentinel
    return bool((t == torch.iinfo(t.dtype).min).all())


def _materialize_buffers(model: Any, device: Any) -> None:
    """Give every meta non-persistent buffer real memory and its value (see module docstring)."""
    import torch

    made: list[tuple[Any, str]] = []
    for module in model.modules():
        for name in list(module._non_persistent_buffers_set):
            buf = module._buffers.get(name)
            if buf is not None and buf.is_meta:
                module._buffers[name] = _sentinel(torch.empty_like(buf, device=device))
                made.append((module, name))
    if not made:
        return
    if hasattr(model, "initialize_weights"):
        for t in [*model.parameters(), *(b for _, b in _persistent_buffers(model))]:
            t._is_hf_initialized = True
        made_ids = {id(m._buffers[n]) for m, n in made}
        for module in model.modules():
            for b in module.buffers(recurse=False):
                if id(b) not in made_ids:
                    b._is_hf_initialized = True
        with torch.no_grad():
            model.initialize_weights()
    missing = []
    for module, name in made:
        if _is_sentinel(module._buffers[name]):
            _recompute_rope(module, name, device)
        if _is_sentinel(module._buffers[name]):
            missing.append(f"{type(module).__name__}.{name}")
    if missing:
        raise LoaderError(
            f"cannot compute non-persistent buffers {', '.join(sorted(set(missing)))} for this model "
            "with this transformers version",
            "upgrade transformers; or load the tensors with load_state_dict and build the model yourself",
        )


def _recompute_rope(module: Any, name: str, device: Any) -> None:
    """transformers 4.x: rotary modules keep their init function; call it as their __init__ did."""
    fn = getattr(module, "rope_init_fn", None)
    if fn is None or name not in ("inv_freq", "original_inv_freq"):
        return
    with contextlib.suppress(TypeError):
        inv_freq, scaling = fn(module.config, device)
        module._buffers[name].copy_(inv_freq)
        if hasattr(module, "attention_scaling"):
            module.attention_scaling = scaling
