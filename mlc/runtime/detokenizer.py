"""Incremental detokenization and stop-string matching for streamed outputs.

`IncrementalDetokenizer` turns token ids into text pieces whose concatenation equals decoding
all ids at once: it decodes a small window of previous tokens plus the new ones and emits the
difference (so leading spaces come out right for byte-level BPE and SentencePiece decoders),
and holds back text ending in U+FFFD until the UTF-8 character is complete.

`StopStringMatcher` sits after it: it never emits text that could still turn into a stop
string, and cuts the output where a stop string begins.
"""

from __future__ import annotations

import copy
from typing import Sequence

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 6  # prompt tokens decoded ahead of the output, for spacing


class IncrementalDetokenizer:
    """Decode one sequence's generated tokens piece by piece.

    `tokenizer` is a `tokenizers.Tokenizer` (anything with `decode(ids,
    skip_special_tokens=...)`). `prompt_ids`, when given, provide the context that decides
    whether the first generated token starts with a space; prompt text is never emitted.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids or [])[-PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = context
        self._prefix_offset = 0                # window start: decoded for context only
        self._read_offset = len(context)       # tokens before this are already emitted
        self.output_ids: list[int] = []
        self.text = ""                         # everything emitted so far

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` as this detokenizer decodes them."""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token_id: int) -> str:
        """Add one generated token; return the newly completed text ("" if held back)."""
        prefix_ids, full_ids = self.windows([token_id])
        return self.advance(self.decode(prefix_ids), self.decode(full_ids))

    def windows(self, token_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Add generated tokens; return the two id windows whose decoded texts `advance`
        needs (so a caller can decode many sequences' windows in one batch call)."""
        for t in token_ids:
            self._ids.append(int(t))
            self.output_ids.append(int(t))
        return (self._ids[self._prefix_offset:self._read_offset],
                self._ids[self._prefix_offset:])

    def advance(self, prefix_text: str, new_text: str) -> str:
        """The text completed by the tokens of the last `windows` call, given its windows'
        decoded texts ("" while the end is an incomplete UTF-8 character)."""
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or an incomplete UTF-8 character at the end
        delta = _text_after(prefix_text, new_text)
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._trim()
        self.text += delta
        return delta

    def copy(self) -> IncrementalDetokenizer:
        """An independent copy of the state (to replay tokens one by one)."""
        other = copy.copy(self)
        other._ids, other.output_ids = list(self._ids), list(self.output_ids)
        return other

    def put_many(self, token_ids: Sequence[int]) -> str:
        """Add several tokens; return the newly completed text."""
        return "".join(self.put(t) for t in token_ids)

    def flush(self) -> str:
        """The held-back text, at the end of the sequence (may contain U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self.decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self.decode(self._ids[self._prefix_offset:])
        delta = _text_after(prefix_text, new_text)
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def _trim(self) -> None:
        """Drop ids before the window so memory stays bounded on long outputs."""
        if self._prefix_offset > 64:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0


def _text_after(prefix_text: str, new_text: str) -> str:
    """What new_text adds to prefix_text (from their common prefix when they diverge)."""
    if new_text.startswith(prefix_text):
        return new_text[len(prefix_text):]
    common = 0
    for a, b in zip(prefix_text, new_text):
        if a != b:
            break
        common += 1
    return new_text[common:]


def detokenize_step(tokenizer, detoks: Sequence[IncrementalDetokenizer],
                    new_tokens: Sequence[Sequence[int]]) -> list[str]:
    """The new text of each sequence after this step's tokens, with one `decode_batch` call
    for the whole step (the tokenizer's own batch decode) instead of two calls per token."""
    windows: list[list[int]] = []
    for detok, ids in zip(detoks, new_tokens):
        windows.extend(detok.windows(ids))
    if not windows:
        return []
    skip = detoks[0].skip_special_tokens
    if hasattr(tokenizer, "decode_batch") and all(d.skip_special_tokens == skip for d in detoks):
        texts = tokenizer.decode_batch(windows, skip_special_tokens=skip)
    else:
        texts = [detoks[i // 2].decode(w) for i, w in enumerate(windows)]
    return [d.advance(texts[2 * i], texts[2 * i + 1]) for i, d in enumerate(detoks)]


class StopStringMatcher:
    """Withhold text that may begin a stop string; cut the output at the first stop string.

    `put(text)` returns (text safe to emit, stopped). After a stop, everything is dropped.
    """

    def __init__(self, stop_strs: Sequence[str]):
        self.stop_strs = [s for s in stop_strs if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the output

    def put(self, text: str) -> tuple[str, bool]:
        """Add newly decoded text; return (text to emit, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self.stop_strs:
            return text, False
        buffer = self._held + text
        first, matched = len(buffer) + 1, None
        for stop in self.stop_strs:
            pos = buffer.find(stop)
            if pos != -1 and pos < first:
                first, matched = pos, stop
        if matched is not None:
            self.stopped, self.matched, self._held = True, matched, ""
            return buffer[:first], True
        hold = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold], False

    def copy(self) -> StopStringMatcher:
        """An independent copy of the state."""
        return copy.copy(self)

    def flush(self) -> str:
        """The withheld text, when the sequence ends without a stop string."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        return held

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop_strs:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best
