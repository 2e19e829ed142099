"""What every weight source gives `mlc convert`: an HF-style config, tensors by HF name loaded
one at a time, tokenizer files, the chat template, generation defaults and special tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Files copied from a source into the converted model dir when present.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class SpecialTokens:
    """Special token ids and strings, as the runtime needs them."""

    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = False


class SourceModel:
    """A model to convert. Subclasses fill the attributes and implement the tensor access."""

    def __init__(self, name: str):
        self.name = name                                   # the source string as given
        self.hf_config: dict[str, Any] = {}                # config.json fields (model_type...)
        self.generation_config: dict[str, Any] = {}        # generation_config.json
        self.tokenizer_files: dict[str, bytes | Path] = {}  # file name -> content or path
        self.chat_template: str | None = None
        self.conv_template: Any = None                     # an MLC conv template, if any
        self.special_tokens = SpecialTokens()

    def tensor_names(self) -> list[str]:
        """HF names of the tensors this source holds."""
        raise NotImplementedError

    def get(self, name: str, dtype: Any = None) -> np.ndarray:
        """Load one tensor by HF name, as float32/its stored dtype, or cast to `dtype`."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> SourceModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def normalize_hf_config(hf: dict[str, Any]) -> dict[str, Any]:
    """Older field names from newer configs: transformers >= 5 writes `rope_parameters`
    ({rope_theta, rope_type, factor ...}) where config.json used to have `rope_theta` and
    `rope_scaling`; model configs read the older names."""
    hf = dict(hf)
    rope = hf.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            hf.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default" and not hf.get("rope_scaling"):
            hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return hf


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json writes a token either as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def read_chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The jinja chat template: chat_template.jinja, chat_template.json or tokenizer_config."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template: Any = None
    as_json = directory / "chat_template.json"
    if as_json.is_file():
        template = json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):       # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def resolve_special_tokens(hf_config: dict[str, Any], generation_config: dict[str, Any],
                           tokenizer_config: dict[str, Any],
                           tokenizer_json: dict[str, Any] | None) -> SpecialTokens:
    """Special tokens from tokenizer_config.json, looked up in tokenizer.json for their ids;
    ids in generation_config.json / config.json fill the gaps (generation_config wins for eos,
    as HF generation does)."""
    vocab: dict[str, int] = {}
    if tokenizer_json:
        model_vocab = tokenizer_json.get("model", {}).get("vocab")
        if isinstance(model_vocab, dict):
            vocab.update(model_vocab)
        elif isinstance(model_vocab, list):      # Unigram: [[piece, score], ...]
            vocab.update({p[0]: i for i, p in enumerate(model_vocab)})
        for tok in tokenizer_json.get("added_tokens", []):
            vocab[tok["content"]] = tok["id"]

    toks = SpecialTokens()
    for kind in ("bos", "eos", "pad", "unk"):
        setattr(toks, f"{kind}_token", _token_str(tokenizer_config.get(f"{kind}_token")))
    ids = {kind: vocab.get(getattr(toks, f"{kind}_token")) for kind in ("bos", "eos", "pad",
                                                                        "unk")}

    def first(*values):
        return next((v for v in values if v is not None), None)

    bos = first(generation_config.get("bos_token_id"), hf_config.get("bos_token_id"), ids["bos"])
    toks.bos_token_id = _as_list(bos)[0] if _as_list(bos) else None
    toks.eos_token_ids = _as_list(first(generation_config.get("eos_token_id"),
                                        hf_config.get("eos_token_id"), ids["eos"]))
    if ids["eos"] is not None and ids["eos"] not in toks.eos_token_ids:
        toks.eos_token_ids.append(ids["eos"])
    pad = first(ids["pad"], generation_config.get("pad_token_id"), hf_config.get("pad_token_id"))
    toks.pad_token_id = _as_list(pad)[0] if _as_list(pad) else None
    toks.unk_token_id = ids["unk"]
    inverse = {i: s for s, i in vocab.items()}
    if toks.bos_token is None and toks.bos_token_id is not None:
        toks.bos_token = inverse.get(toks.bos_token_id)
    if toks.eos_token is None and toks.eos_token_ids:
        toks.eos_token = inverse.get(toks.eos_token_ids[0])
    add_bos = tokenizer_config.get("add_bos_token")
    if add_bos is None and tokenizer_json:
        # A TemplateProcessing post-processor that inserts bos is how fast tokenizers add it.
        post = json.dumps(tokenizer_json.get("post_processor") or {})
        add_bos = toks.bos_token is not None and f'"id": "{toks.bos_token}"' in post
    toks.add_bos_token = bool(add_bos)
    return toks
