"""Turn generated token ids into the text a client sees: incremental decoding and stop strings."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Decodes one generated token at a time, with the prompt as context.

    Decoding the generated ids on their own loses what depends on the tokens before them: a
    SentencePiece tokenizer drops the leading space of a sequence's first word ("▁Hello" ->
    "Hello"), so the first streamed token would lose its space. ``tokenizers``' DecodeStream, primed
    with the prompt's last ids, decodes each new id in context and holds back an incomplete
    UTF-8 character until the ids that finish it arrive.
    """

    _CONTEXT = 8  # prompt ids kept as context: enough for any merge or byte sequence across the boundary

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int] = ()):
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(ids=list(prompt_ids[-self._CONTEXT:]), skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""


class StopMatcher:
    """Holds back text that could still grow into a stop string; cuts the text at the first stop."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self._stops = [s for s in stops if s]
        self._text = ""
        self._sent = 0
        self.stopped = False

    def feed(self, delta: str, check: bool = True) -> str:
        """Text that is safe to send after appending ``delta``; sets ``stopped`` on a stop string
        (with ``check`` off, nothing stops: the text so far is sent and not searched again)."""
        self._text += delta
        if not self._stops or not check:
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
