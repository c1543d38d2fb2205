"""Turn generated token ids into the text a client sees: incremental decoding and stop strings."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Decodes one token at a time without re-decoding the whole sequence.

    Decoding a token alone loses the spaces and multi-byte characters that depend on its
    neighbours, so each step decodes a short window of recent ids and emits the part of the
    window's text that is new; text ending in an incomplete character (U+FFFD) waits for more ids.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        seen = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) > len(seen) and not window.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return window[len(seen) :]
        return ""


class StopMatcher:
    """Holds back text that could still grow into a stop string; cuts the text at the first stop."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self._stops = [s for s in stops if s]
        self._text = ""
        self._sent = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text that is safe to send after appending ``delta``; sets ``stopped`` on a stop string."""
        self._text += delta
        if not self._stops:
            out, self._sent = self._text[self._sent :], len(self._text)
            return out
        hits = [i for i in (self._text.find(s, self._sent) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
            out, self._sent = self._text[self._sent : end], end
            return out
        safe = len(self._text) - self._partial_stop_suffix()
        out, self._sent = self._text[self._sent : safe], max(self._sent, safe)
        return out

    def flush(self) -> str:
        """The held-back tail, once generation has ended for another reason."""
        if self.stopped:
            return ""
        out, self._sent = self._text[self._sent :], len(self._text)
        return out

    def _partial_stop_suffix(self) -> int:
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._text) - self._sent), longest, -1):
                if self._text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
