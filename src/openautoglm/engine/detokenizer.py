"""Incremental detokenization: each step's new token ids → the text that is safe to stream, with stop strings.

Byte-level BPE (GLM's tokenizer) splits a multi-byte character over several tokens, so one token's text can
be half a character. For byte-level tokenizers the detokenizer works on bytes: each token's bytes go through
one incremental UTF-8 decoder, which holds an unfinished character back until its last byte arrives and
replaces invalid bytes exactly as decoding the whole sequence would. Other tokenizers go through prefix/read
offsets: decode a small window of recent tokens and emit what it adds, holding back while it ends in U+FFFD.

Stop strings are searched in the held-back text plus the new text only, so each step costs O(new tokens + the
longest stop string), never O(text so far). Text that might start a stop string is held back until the next
tokens decide it.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openautoglm.engine.tokenizer import Tokenizer

# Prompt tokens decoded before the first output token on the offsets path, so that tokenizers whose decoders
# treat the start of text specially (a leading "▁" turning into no space) decode the output as a continuation.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True, slots=True)
class DetokenizerStep:
    text: str  # new text safe to emit
    stop_str: str | None = None  # the stop string that matched; the sequence finishes with it as stop reason


class IncrementalDetokenizer:
    """Per-sequence detokenizer state. ``step`` for each batch of new tokens; ``flush`` when the sequence ends
    for another reason than a stop string (length, eos, abort): it returns the text still held back."""

    __slots__ = (
        "_context",
        "_held",
        "_include_stop",
        "_prefix",
        "_read",
        "_skip",
        "_skip_ids",
        "_stop_str",
        "_stops",
        "_tok",
        "_token_bytes",
        "_utf8",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop if s))
        self._include_stop = include_stop_str_in_output
        self._held = ""  # decoded text not emitted yet: it may be the start of a stop string
        self._stop_str: str | None = None
        self._utf8: codecs.IncrementalDecoder | None = None  # set on the bytes path only
        if tokenizer.is_byte_level:
            self._skip_ids = tokenizer.skipped_special_ids if skip_special_tokens else frozenset()
            self._token_bytes = tokenizer.token_bytes
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._context = [int(i) for i in prompt_token_ids[-_CONTEXT_TOKENS:]]
            self._prefix = 0
            self._read = len(self._context)

    @property
    def stop_str(self) -> str | None:
        """The stop string that ended the sequence, if one did."""
        return self._stop_str

    def step(self, new_token_ids: Sequence[int]) -> DetokenizerStep:
        if self._stop_str is not None:
            return DetokenizerStep("")  # finished: whatever comes after a stop string is not output
        text = self._decode_bytes(new_token_ids) if self._utf8 is not None else self._decode_offsets(new_token_ids)
        if not self._stops:
            return DetokenizerStep(text)
        return self._find_stop(self._held + text if self._held else text)

    def flush(self) -> str:
        if self._stop_str is not None:
            return ""
        tail = self._utf8.decode(b"", final=True) if self._utf8 is not None else self._flush_offsets()
        text, self._held = self._held + tail, ""
        return text

    # ------------------------------------------------------------------------------------------- bytes path

    def _decode_bytes(self, ids: Sequence[int]) -> str:
        skip, token_bytes = self._skip_ids, self._token_bytes
        if len(ids) == 1:
            i = ids[0]
            return "" if i in skip else self._utf8.decode(token_bytes(i))
        return self._utf8.decode(b"".join([token_bytes(i) for i in ids if i not in skip]))

    # ----------------------------------------------------------------------------------------- offsets path

    def _decode_offsets(self, ids: Sequence[int]) -> str:
        ctx = self._context
        ctx.extend(ids)
        before = self._tok.decode(ctx[self._prefix : self._read], self._skip)
        after = self._tok.decode(ctx[self._prefix :], self._skip)
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or an unfinished character: wait for the next token
        # The window slides: the tokens read so far become the prefix that gives the next ones their context.
        del ctx[: self._read]
        self._prefix, self._read = 0, len(ctx)
        return after[len(before) :]

    def _flush_offsets(self) -> str:
        ctx = self._context
        before = self._tok.decode(ctx[self._prefix : self._read], self._skip)
        after = self._tok.decode(ctx[self._prefix :], self._skip)
        self._prefix = self._read = len(ctx)
        return after[len(before) :] if len(after) > len(before) else ""

    # ------------------------------------------------------------------------------------------ stop strings

    def _find_stop(self, pending: str) -> DetokenizerStep:
        # The stop string that ends first wins (ties: the one that starts first). That is what token-by-token
        # checking finds, so the result does not depend on how many tokens each step brings.
        best: tuple[int, int, str] | None = None
        for s in self._stops:
            i = pending.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            end, start, s = best
            self._stop_str, self._held = s, ""
            return DetokenizerStep(pending[: end if self._include_stop else start], s)
        hold = self._partial_stop_len(pending)
        if hold:
            self._held = pending[-hold:]
            return DetokenizerStep(pending[:-hold])
        self._held = ""
        return DetokenizerStep(pending)

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        if not text:
            return 0
        last = text[-1]
        best = 0
        for s in self._stops:
            k = min(len(s) - 1, len(text))
            while k > best:
                j = s.rfind(last, 0, k)  # a matching prefix must end with text's last character
                if j < 0 or j + 1 <= best:
                    break
                if text.endswith(s[: j + 1]):
                    best = j + 1
                    break
                k = j
        return best
