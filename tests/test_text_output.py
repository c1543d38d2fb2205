"""Incremental decoding and stop strings."""

from __future__ import annotations

from axiscap.server.engines.hf.text_output import IncrementalDetokenizer, StopMatcher


def test_incremental_decoding_equals_whole_decoding(smollm2):
    tok = smollm2.tokenizer
    text = "Héllo wörld — naïve café 😀 ok!  Two  spaces\nnew line, 東京."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_split_across_deltas_is_held_back_and_cut():
    m = StopMatcher(["END"])
    out = [m.feed(d) for d in ["Hello E", "N", "D and more"]]
    assert out == ["Hello ", "", ""] and m.stopped
    assert m.flush() == ""


def test_partial_stop_that_does_not_complete_is_released():
    m = StopMatcher(["\n\n", "STOP"])
    assert m.feed("a ST") == "a "
    assert m.feed("ART") == "START"
    assert m.feed("x\n") == "x"
    assert m.flush() == "\n"
    assert not m.stopped


def test_earliest_stop_wins():
    m = StopMatcher(["b", "a"])
    assert m.feed("xxab") == "xx" and m.stopped


def test_no_stops_passes_everything():
    m = StopMatcher([])
    assert m.feed("abc") == "abc" and m.feed("") == "" and m.flush() == ""


def test_first_generated_token_keeps_its_leading_space_with_the_prompt_as_context():
    """A SentencePiece-style tokenizer marks a word's leading space ("▁Hello") and drops it at the
    start of a decode; decoded after the prompt, the first streamed token keeps it (as vLLM streams)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "▁Hi": 1, "▁Hello": 2, "▁world": 3, "!": 4}, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tok.decode([2, 3]) == "Hello world"  # on their own, the generated ids lose the space
    detok = IncrementalDetokenizer(tok, prompt_ids=[1])
    assert [detok.push(i) for i in (2, 3, 4)] == [" Hello", " world", "!"]
    assert tok.decode([1, 2, 3, 4]) == "Hi" + " Hello world!"
