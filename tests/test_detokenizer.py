"""Incremental detokenization on a real byte-level BPE tokenizer, and stop-string matching."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mlc.runtime.detokenizer import IncrementalDetokenizer, StopStringMatcher

CORPUS = [
    "héllo wörld 日本語 🎉",
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus München! Ça va très bien, merci.",
    "日本語のテキストと絵文字 🎉🚀 が混ざっています。",
    "  leading spaces, tabs\tand\nnewlines  ",
    "<|im_end|> is special",
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tok


def _stream(tokenizer, ids, prompt_ids=None):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids)
    pieces = [detok.put(t) for t in ids]
    pieces.append(detok.flush())
    return pieces, detok


@pytest.mark.parametrize("text", CORPUS + ["never seen: ñandú 中文 👍🏽 ok"])
def test_stream_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text).ids
    pieces, detok = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == detok.text
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_characters_are_split_across_tokens(tokenizer):
    # The untrained emoji must be byte tokens: the test above really covers partial UTF-8.
    ids = tokenizer.encode("👍🏽").ids
    assert len(ids) > 2
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)


def test_random_token_sequences(tokenizer):
    rng = random.Random(0)
    vocab = tokenizer.get_vocab_size()
    for _ in range(50):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        pieces, _ = _stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids)


def test_prompt_context_is_not_emitted(tokenizer):
    prompt = tokenizer.encode("The quick brown").ids
    output = tokenizer.encode(" fox jumps 日本語").ids
    pieces, _ = _stream(tokenizer, output, prompt_ids=prompt)
    assert "".join(pieces) == tokenizer.decode(output) == " fox jumps 日本語"


def test_special_tokens_skipped(tokenizer):
    ids = tokenizer.encode("hello").ids + [tokenizer.token_to_id("<|im_end|>")]
    pieces, _ = _stream(tokenizer, ids)
    assert "".join(pieces) == "hello"


def _match(stops, chunks):
    matcher = StopStringMatcher(stops)
    out, stopped = [], False
    for chunk in chunks:
        text, stopped = matcher.put(chunk)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), stopped, matcher


def test_stop_string_split_across_chunks():
    text, stopped, matcher = _match(["<|im_end|>"], ["Hello", " world<|im", "_e", "nd|> more"])
    assert (text, stopped, matcher.matched) == ("Hello world", True, "<|im_end|>")


def test_partial_stop_prefix_is_held_then_released():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.put("abc ST") == ("abc ", False)
    assert matcher.put("OP") == ("", True)
    matcher = StopStringMatcher(["STOP"])
    assert matcher.put("abc ST") == ("abc ", False)
    assert matcher.put("ART") == ("START", False)
    matcher = StopStringMatcher(["STOP"])
    assert matcher.put("x S") == ("x ", False)
    assert matcher.flush() == "S"


def test_earliest_stop_wins_and_nothing_after_stop():
    text, stopped, matcher = _match(["world", "lo w"], ["hello world"])
    assert (text, stopped, matcher.matched) == ("hel", True, "lo w")
    assert matcher.put("more") == ("", True)


def test_no_stop_strings_passes_through():
    assert _match([], ["a", "b"])[:2] == ("ab", False)


def test_stop_never_leaks_on_random_splits():
    rng = random.Random(1)
    base = "some text before ##END## and after"
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(base)), rng.randrange(1, 10)))
        chunks = [base[i:j] for i, j in zip([0] + cuts, cuts + [len(base)])]
        emitted = []
        matcher = StopStringMatcher(["##END##", "zzz"])
        for chunk in chunks:
            text, stopped = matcher.put(chunk)
            emitted.append(text)
            assert "#" not in "".join(emitted)
            if stopped:
                break
        assert "".join(emitted) == "some text before "


def test_detokenizer_and_matcher_together(tokenizer):
    ids = tokenizer.encode("Grüße aus München! Ça va très bien").ids
    detok, matcher = IncrementalDetokenizer(tokenizer), StopStringMatcher(["Ça"])
    out = []
    for t in ids:
        text, stopped = matcher.put(detok.put(t))
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Grüße aus München! "


def test_sentencepiece_style_leading_space_and_byte_fallback():
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"] + byte_tokens,
                                  show_progress=False)
    tok.train_from_iterator(["hello world foo bar héllo"], trainer=trainer)
    prompt, output = tok.encode("hello world").ids, tok.encode("foo bar 日本 🎉").ids
    # The byte tokens are "special" in this toy vocab, so keep them when decoding.
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=False)
    pieces = [detok.put(t) for t in output] + [detok.flush()]
    full = tok.decode(prompt + output, skip_special_tokens=False)
    assert "".join(pieces) == " foo bar 日本 🎉" == full[len("hello world"):]
    assert "\ufffd" not in "".join(pieces)
    # Without prompt context the first token's space is stripped, as in a plain decode.
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    text = detok.put_many(output) + detok.flush()
    assert text == tok.decode(output, skip_special_tokens=False) == "foo bar 日本 🎉"
