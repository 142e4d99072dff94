"""Incremental detokenization and stop strings against a real byte-level BPE tokenizer."""

from __future__ import annotations

import pytest

from ember.worker.detokenizer import REPLACEMENT_CHAR, TextStream

MULTIBYTE = "Zürich 東京 🙂🚀 naïve"


def _byte_level_table() -> dict[int, str]:
    """GPT-2's byte → printable char mapping, which the ByteLevel pre-tokenizer uses for token strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _byte_level_table()


def byte_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: the worst case, every multi-byte char spans several tokens."""
    return tokenizer.convert_tokens_to_ids([BYTE_TO_CHAR[b] for b in text.encode()])


def stream_all(tokenizer, ids: list[int], stop: tuple[str, ...] = (), prompt: list[int] | None = None):
    stream = TextStream(tokenizer, prompt or [], stop)
    deltas = []
    for i in ids:
        deltas.append(stream.push(i))
        if stream.stopped:
            break
    else:
        deltas.append(stream.finish())
    return deltas, stream


@pytest.mark.parametrize("split", ["bytes", "bpe"])
def test_multibyte_text_is_never_emitted_half_done(backend_tokenizer, split):
    ids = byte_ids(backend_tokenizer, MULTIBYTE) if split == "bytes" else backend_tokenizer.encode(MULTIBYTE)
    assert len(ids) > 1
    deltas, _ = stream_all(backend_tokenizer, ids, prompt=backend_tokenizer.encode("say:"))
    assert "".join(deltas) == MULTIBYTE
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    if split == "bytes":  # a char of n bytes emits nothing for its first n-1 bytes; finish() adds one ""
        assert deltas.count("") == sum(len(c.encode()) - 1 for c in MULTIBYTE) + 1


def test_unfinished_character_at_the_end_is_flushed(backend_tokenizer):
    ids = byte_ids(backend_tokenizer, "ok 🙂")[:-1]  # cut inside the emoji
    deltas, _ = stream_all(backend_tokenizer, ids)
    assert "".join(deltas[:-1]) == "ok "
    assert deltas[-1].startswith(REPLACEMENT_CHAR)


def test_stop_string_truncates_and_holds_back_prefixes(backend_tokenizer):
    text = "The quick brown fox jumps"
    ids = byte_ids(backend_tokenizer, text)
    deltas, stream = stream_all(backend_tokenizer, ids, stop=("brown fox",))
    assert stream.stopped
    assert "".join(deltas) == "The quick " == stream.emitted_text
    # "b", "br", … were held back while they could still become "brown fox"
    assert "b" not in "".join(deltas[:-1])


def test_held_back_prefix_is_released_when_it_does_not_match(backend_tokenizer):
    text = "the brown bear"
    deltas, stream = stream_all(backend_tokenizer, byte_ids(backend_tokenizer, text), stop=("brown fox",))
    assert not stream.stopped
    assert "".join(deltas) == text


def test_stop_string_split_across_multibyte_tokens(backend_tokenizer):
    deltas, stream = stream_all(backend_tokenizer, byte_ids(backend_tokenizer, "a 東京 b"), stop=("京",))
    assert stream.stopped and "".join(deltas) == "a 東"


def test_replay_rebuilds_the_state_of_a_running_stream(backend_tokenizer):
    ids = byte_ids(backend_tokenizer, "café 🙂 brown fo")
    live = TextStream(backend_tokenizer, [], ("brown fox",))
    for i in ids[:-2]:
        live.push(i)
    replayed = TextStream.replay(backend_tokenizer, [], ids[:-2], ("brown fox",))
    assert replayed.emitted_text == live.emitted_text
    assert [replayed.push(i) for i in ids[-2:]] == [live.push(i) for i in ids[-2:]]
    assert replayed.finish() == live.finish() == "brown fo"
