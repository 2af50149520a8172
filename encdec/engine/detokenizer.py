"""Text deltas of a growing token list, for streaming: each piece of text is sent once, whole.

Decoding each new token alone is wrong twice over: sentencepiece drops the space a ``▁word``
piece carries when the piece starts the decoded text, and byte-level BPE or byte-fallback
pieces split one UTF-8 character over several tokens (alone, each decodes to U+FFFD). So a
delta is the difference between decoding a short window that ends with the new tokens and
decoding the same window without them: the window's first tokens give the new ones their
context (spaces), and a difference that ends in U+FFFD (an incomplete character) is held back
until the tokens that complete it arrive. Each call decodes only that window, not the whole
output. :meth:`IncrementalDetokenizer.finish` reconciles with one decode of every token, so the
concatenated deltas equal the text a non-streamed request returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
"""What a decoder emits for bytes that are not (yet) a whole UTF-8 character."""

Decode = Callable[[Sequence[int]], "str | None"]
"""Token ids to text (None: this output has no text, e.g. a token-id request without a tokenizer)."""


class IncrementalDetokenizer:
    """Feed tokens with :meth:`add`, get the text they complete; :meth:`finish` at the end."""

    def __init__(self, decode: Decode):
        self._decode = decode
        self.token_ids: list[int] = []
        self.text = ""
        """The text handed out so far (the concatenated deltas)."""
        self._context = 0
        """Start of the decoding window: the tokens before the last delta's, for their spacing."""
        self._read = 0
        """Tokens whose text has been handed out."""
        self.consistent = True
        """False if the final decode did not extend what was streamed (text already sent cannot
        be taken back; the tokenizer's decode is then not prefix-stable)."""

    def add(self, token_ids: Sequence[int]) -> str:
        """The text the new tokens complete ("" while a character or word is incomplete)."""
        self.token_ids.extend(int(t) for t in token_ids)
        if not token_ids or self._read == len(self.token_ids):
            return ""
        before = self._decode(self.token_ids[self._context : self._read])
        after = self._decode(self.token_ids[self._context :])
        if before is None or after is None:
            return ""
        if len(after) <= len(before) or not after.startswith(before) or after.endswith(REPLACEMENT):
            return ""  # nothing new yet, a decoder that rewrote its window, or a partial character
        delta = after[len(before) :]
        self._context, self._read = self._read, len(self.token_ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The rest of the text, from one decode of every token (partial characters included)."""
        full = self._decode(self.token_ids)
        if full is None:
            return ""
        if not full.startswith(self.text):
            self.consistent = False
            return ""
        delta = full[len(self.text) :]
        self.text = full
        self._context = self._read = len(self.token_ids)
        return delta
