"""A random-weight Llama-family model in Hugging Face layout, built locally in seconds.

Tests, the demo and the benchmarks need a real model directory without downloading one. The
weights are random (seeded, so every build of a size and seed is byte-identical), the tokenizer
is a byte-level BPE trained on demo_corpus.txt, which ships with this package.

Sizes (weights file):
- tiny:   fp32, ~10 MB  — 2 layers, hidden 256: unit and integration tests.
- small:  fp32, ~150 MB — 8 layers, hidden 640: the local demo (`make run`).
- medium: bf16, ~1 GB   — 20 layers, hidden 1536: loader benchmarks (bf16 like real LLM
  checkpoints, and twice the parameters per byte).

Weights are drawn with std 0.1 rather than the usual 0.02 so that the random model's logits
have clear gaps between the top tokens: greedy decoding then picks the same token on every code
path, and tests comparing outputs across loaders or migration are not at the mercy of ties.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ember.ckpt_format.errors import CheckpointError
from ember.ckpt_format.spec import DTYPE_ITEMSIZE

INIT_STD = 0.1
VOCAB_SIZE = 2048
MAX_POSITIONS = 2048

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

#: Role markers are special tokens; generation stops at <|end|> or <|eos|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class DemoSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    dtype: str


SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=704, dtype="float32"),
    "small": DemoSize(hidden=640, layers=8, heads=10, kv_heads=5, intermediate=1728, dtype="float32"),
    "medium": DemoSize(hidden=1536, layers=20, heads=12, kv_heads=4, intermediate=4096, dtype="bfloat16"),
}


def build_demo_model(dir: str | os.PathLike[str], size: str = "tiny", seed: int = 0) -> Path:
    """Write a random Llama model (config, weights, tokenizer, generation config) into `dir`.

    The directory is created if needed; existing files of the same names are replaced. Returns
    the directory. Loads offline with transformers' AutoModelForCausalLM / AutoTokenizer.
    """
    if size not in SIZES:
        raise CheckpointError(
            f"unknown demo model size {size!r}", f"choose one of: {', '.join(SIZES)}"
        )
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    dims = SIZES[size]
    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab_size()
    bos, eos, pad = (tokenizer.token_to_id(t) for t in (BOS, EOS, PAD))
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "model_max_length": MAX_POSITIONS,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.hidden // dims.heads,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": INIT_STD,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": dims.dtype,
        "dtype": dims.dtype,
        "use_cache": True,
    }
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": bos, "eos_token_id": [eos, tokenizer.token_to_id("<|end|>")], "pad_token_id": pad, "do_sample": False},
    )
    _write_weights(out / "model.safetensors", dims, vocab, seed)
    return out


def train_tokenizer():
    """Byte-level BPE trained on the shipped corpus; deterministic (single-threaded trainer input)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    text = resources.files("ember.ckpt_format").joinpath("demo_corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return tok


def weight_shapes(dims: DemoSize, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama model's weights, in the order HF writes them."""
    kv = dims.kv_heads * (dims.hidden // dims.heads)
    h, m = dims.hidden, dims.intermediate
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(dims.layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (m, h)),
            (p + "mlp.up_proj.weight", (m, h)),
            (p + "mlp.down_proj.weight", (h, m)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def _write_weights(path: Path, dims: DemoSize, vocab: int, seed: int) -> None:
    """Stream a safetensors file tensor by tensor, so memory stays at one tensor (medium: 1 GB)."""
    import torch

    dtype = getattr(torch, dims.dtype)
    gen = torch.Generator().manual_seed(seed)
    shapes = weight_shapes(dims, vocab)
    itemsize = DTYPE_ITEMSIZE[dims.dtype]
    st_dtype = {"float32": "F32", "bfloat16": "BF16"}[dims.dtype]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads the header to 8 bytes with spaces

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype)
            else:
                t = (torch.randn(shape, generator=gen) * INIT_STD).to(dtype)
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
