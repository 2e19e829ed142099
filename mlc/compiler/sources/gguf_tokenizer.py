"""Rebuild a Hugging Face `tokenizer.json` from the vocabulary a GGUF file carries.

Two GGUF tokenizer models are handled:
  - "gpt2": byte-level BPE (tokens are byte-level strings, merges given) - SmolLM2, Llama 3,
    Qwen2 ...; the pre-tokenizer follows `tokenizer.ggml.pre`.
  - "llama": SentencePiece BPE (tokens with "▁" for spaces, scores, <0xXX> byte tokens, no
    merges): merges are derived from the scores, with byte fallback.
CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, processors
from tokenizers import pre_tokenizers as pre

from mlc.errors import ConvertError

# gguf.TokenType values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Llama 3's split pattern (llama.cpp "llama-bpe"); other byte-level models use GPT-2's.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class GGUFVocab:
    """The tokenizer fields of a GGUF file (`tokenizer.ggml.*`)."""

    model: str
    tokens: list[str]
    token_types: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    pre: str = "default"
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = True


def _byte_level_pre_tokenizer(pre_name: str):
    if pre_name == "llama-bpe":
        return pre.Sequence([
            pre.Split(Regex(_LLAMA3_PATTERN), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre_name == "smollm":
        # SmolLM's own tokenizer.json splits digits one by one before the byte-level split.
        return pre.Sequence([pre.Digits(individual_digits=True),
                             pre.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre.ByteLevel(add_prefix_space=False, use_regex=True)


def _sentencepiece_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    # A piece made of two pieces is a merge; SentencePiece applies higher-scored pieces first.
    merges = []
    for piece, pid in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((-scores[pid] if scores else pid, vocab[left], vocab[right],
                               left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def build_tokenizer(v: GGUFVocab) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the GGUF vocabulary."""
    types = v.token_types or [NORMAL] * len(v.tokens)
    if v.model == "gpt2":
        vocab = {tok: i for i, tok in enumerate(v.tokens)}
        merges = [tuple(m.split(" ", 1)) for m in v.merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                   byte_fallback=False))
        tok.pre_tokenizer = _byte_level_pre_tokenizer(v.pre)
        tok.decoder = decoders.ByteLevel()
    elif v.model == "llama":
        vocab = {tok: i for i, tok in enumerate(v.tokens)}
        unk = v.tokens[v.unk_id] if v.unk_id is not None else None
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_sentencepiece_merges(vocab, v.scores),
                                   unk_token=unk, fuse_unk=True, byte_fallback=True))
        # SentencePiece's dummy prefix: "▁" before the text's start only, spaces as "▁".
        tok.pre_tokenizer = pre.Metaspace(
            replacement="▁", prepend_scheme="first" if v.add_space_prefix else "never",
            split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if v.add_space_prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
    else:
        raise ConvertError(
            f"GGUF tokenizer model {v.model!r} is not supported (supported: gpt2, llama).")

    added = []
    for i, (text, kind) in enumerate(zip(v.tokens, types)):
        if kind == CONTROL or (kind == UNKNOWN and v.model == "llama"):
            added.append((i, AddedToken(text, special=True, normalized=False)))
        elif kind == USER_DEFINED:
            added.append((i, AddedToken(text, special=False, normalized=False)))
    # Added tokens already in the vocab keep their ids.
    tok.add_special_tokens([a for _, a in added if a.special])
    tok.add_tokens([a for _, a in added if not a.special])

    single, specials = "$A", []
    if v.add_bos and v.bos_id is not None:
        single = f"{v.tokens[v.bos_id]} {single}"
        specials.append((v.tokens[v.bos_id], v.bos_id))
    if v.add_eos and v.eos_id is not None:
        single = f"{single} {v.tokens[v.eos_id]}"
        specials.append((v.tokens[v.eos_id], v.eos_id))
    if specials:
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} $B", special_tokens=list(dict.fromkeys(specials)))
    elif v.model == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_config(v: GGUFVocab, chat_template: str | None,
                     context_length: int | None) -> dict:
    """The tokenizer_config.json matching `build_tokenizer` (special tokens, template)."""
    def name(i):
        return v.tokens[i] if i is not None and 0 <= i < len(v.tokens) else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(v.bos_id), "eos_token": name(v.eos_id),
        "pad_token": name(v.pad_id), "unk_token": name(v.unk_id),
        "add_bos_token": v.add_bos, "add_eos_token": v.add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if context_length:
        cfg["model_max_length"] = context_length
    if chat_template:
        cfg["chat_template"] = chat_template
    return cfg
