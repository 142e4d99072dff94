"""Incremental detokenization and stop strings: which text a client may see after each token.

Decoding one token at a time is wrong for byte-level and SentencePiece tokenizers: a character
can span several tokens (the first ones decode to U+FFFD) and a token's leading space depends on
what precedes it. Decoding the whole output every step is right but quadratic. We keep two
offsets into the id list, as vLLM does: the text of ids[prefix:read] was already emitted, and
the delta is decode(ids[prefix:]) minus decode(ids[prefix:read]), emitted only when it does not
end in U+FFFD (an unfinished character). A few prompt tokens seed the window so the first
output token decodes with its real left context.

Stop strings sit on top: text that could be the beginning of a stop string is held back until
the next token shows whether it is; the output is truncated before the first stop string.

The state is fully determined by the token ids, so a migrated request rebuilds it by replaying
its output tokens (`TextStream.replay`) and checks the result against the text the source says
it sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Prompt tokens decoded as left context of the first output token (spacing rules of
#: SentencePiece/BPE decoders look back at most a few tokens).
CONTEXT_TOKENS = 6
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _delta(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        return after[len(before) :] if len(after) > len(before) else ""

    def push(self, token_id: int) -> str:
        """Add a token; return the newly stable text ("" while a character is unfinished)."""
        self._ids.append(token_id)
        delta = self._delta()
        if not delta or delta.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return delta

    def flush(self) -> str:
        """At the end of the stream: whatever is pending, unfinished characters included."""
        delta = self._delta()
        self._prefix, self._read = self._read, len(self._ids)
        return delta


class TextStream:
    """Detokenizer + stop strings. `emitted_text` is exactly what the client has been sent."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = tuple(stop)
        self._text = ""
        self._emitted = 0
        self.stopped = False  # a stop string appeared: the request must finish with "stop"

    @property
    def emitted_text(self) -> str:
        return self._text[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add a generated token; return the text delta the client may see now."""
        self._text += self._detok.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The stream ends (EOS, length): release pending characters and held-back text."""
        self._text += self._detok.flush()
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self._text)
        if self._stop:
            hits = [i for i in (self._text.find(s, self._emitted) for s in self._stop) if i >= 0]
            if hits:
                end = min(hits)
                self._text = self._text[:end]
                self.stopped = True
            elif not final:
                end -= self._held_back()
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest unemitted suffix that is a proper prefix of a stop string."""
        pending = len(self._text) - self._emitted
        for n in range(min(pending, max(len(s) for s in self._stop) - 1), 0, -1):
            tail = self._text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    @classmethod
    def replay(
        cls, tokenizer: Any, prompt_ids: Sequence[int], output_ids: Sequence[int], stop: Sequence[str]
    ) -> TextStream:
        """Rebuild the stream state of a request that already generated `output_ids`."""
        stream = cls(tokenizer, prompt_ids, stop)
        for token_id in output_ids:
            stream.push(token_id)
        return stream
