"""A GGUF file (llama.cpp): metadata -> HF config, tensors dequantized and renamed to HF names,
the tokenizer rebuilt as tokenizer.json."""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from mlc.compiler.sources.base import SourceModel, SpecialTokens
from mlc.compiler.sources.gguf_tokenizer import GGUFVocab, build_tokenizer, tokenizer_config
from mlc.errors import ConvertError
from mlc.models.registry import model_for_gguf

# GGUF metadata key (after "<arch>.") -> HF config.json field, for every architecture; an
# architecture adds its own through `gguf_hf_config` in its model file.
_ARCH_KEYS = {
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "block_count": "num_hidden_layers",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
}


def _scalar(value: Any) -> Any:
    # GGUF stores floats as float32: print them as the short decimal they came from (1e-05).
    if isinstance(value, float):
        return float(str(np.float32(value)))
    return value


class GGUFSource(SourceModel):
    """Tensors of a GGUF file by HF name, dequantized to float32 one at a time."""

    def __init__(self, path: str | Path, name: str | None = None):
        super().__init__(name or str(path))
        self.path = Path(path)
        if not self.path.is_file():
            raise ConvertError(f"GGUF file {self.path} does not exist.", param="source")
        try:
            self._reader = gguf.GGUFReader(self.path)
            self._fields = {k: f for k, f in self._reader.fields.items()}
            self._tensors = {t.name: t for t in self._reader.tensors}
        except Exception as e:  # the reader raises ValueError, IndexError, struct errors...
            raise ConvertError(f"Corrupt or truncated GGUF file {self.path}: {e}") from e
        arch = self._meta("general.architecture")
        if not isinstance(arch, str):
            raise ConvertError(f"GGUF file {self.path} has no general.architecture.")
        self.arch = arch
        self._info = info = model_for_gguf(arch)   # unsupported -> lists the supported ones
        self.hf_config = self._hf_config()
        self._config = config = info.config_from_hf(self.hf_config)
        # GGUF name -> HF name, for the tensors present
        bases = info.gguf_names(config)
        self._hf_to_gguf: dict[str, str] = {}
        for gname in self._tensors:
            base, _, suffix = gname.rpartition(".")
            if base in bases:
                self._hf_to_gguf[f"{bases[base]}.{suffix}"] = gname
        self._read_tokenizer()

    # ------------------------------------------------------------------------------ metadata
    def _meta(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise ConvertError(f"Corrupt GGUF metadata {key!r} in {self.path}: {e}") from e

    def _hf_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"model_type": self._info.model_type}
        for key, hf_key in _ARCH_KEYS.items():
            value = self._meta(f"{self.arch}.{key}")
            if value is not None:
                cfg[hf_key] = _scalar(value)
        tokens = self._fields.get("tokenizer.ggml.tokens")
        if "vocab_size" not in cfg:
            emb = self._tensors.get("token_embd.weight")
            cfg["vocab_size"] = (len(tokens.data) if tokens is not None
                                 else int(emb.shape[-1]) if emb is not None else None)
        if cfg.get("head_dim") and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
            if cfg["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]:
                del cfg["head_dim"]          # the default: keep the config minimal
        scaling = self._meta(f"{self.arch}.rope.scaling.type")
        if scaling and scaling != "none":
            cfg["rope_scaling"] = {
                "rope_type": scaling,
                "factor": _scalar(self._meta(f"{self.arch}.rope.scaling.factor", 1.0)),
            }
            orig = self._meta(f"{self.arch}.rope.scaling.original_context_length")
            if orig:
                cfg["rope_scaling"]["original_max_position_embeddings"] = orig
        cfg["tie_word_embeddings"] = "output.weight" not in self._tensors
        for kind in ("bos", "eos", "pad"):
            value = self._meta(f"tokenizer.ggml.{kind}_token_id")
            if value is not None:
                cfg[f"{kind}_token_id"] = int(value)
        return self._info.gguf_hf_config(cfg, lambda key: _scalar(self._meta(
            f"{self.arch}.{key}")))

    def _read_tokenizer(self) -> None:
        model = self._meta("tokenizer.ggml.model")
        self.chat_template = self._meta("tokenizer.chat_template")
        if model is None:
            return                       # no tokenizer inside: the user brings their own

        def ids(key):
            value = self._meta(f"tokenizer.ggml.{key}")
            return int(value) if value is not None else None

        vocab = GGUFVocab(
            model=model, tokens=list(self._meta("tokenizer.ggml.tokens", [])),
            token_types=[int(t) for t in self._meta("tokenizer.ggml.token_type", [])],
            scores=[float(s) for s in self._meta("tokenizer.ggml.scores", [])],
            merges=list(self._meta("tokenizer.ggml.merges", [])),
            pre=self._meta("tokenizer.ggml.pre", "default"),
            bos_id=ids("bos_token_id"), eos_id=ids("eos_token_id"), unk_id=ids("unknown_token_id"),
            pad_id=ids("padding_token_id"),
            add_bos=bool(self._meta("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(self._meta("tokenizer.ggml.add_eos_token", False)),
            add_space_prefix=bool(self._meta("tokenizer.ggml.add_space_prefix", True)),
        )
        tok = build_tokenizer(vocab)
        tok_cfg = tokenizer_config(vocab, self.chat_template,
                                   self.hf_config.get("max_position_embeddings"))
        self.tokenizer_files = {
            "tokenizer.json": tok.to_str(pretty=True).encode(),
            "tokenizer_config.json": (json.dumps(tok_cfg, indent=2, ensure_ascii=False)
                                      + "\n").encode(),
        }

        def name(i):
            return vocab.tokens[i] if i is not None and 0 <= i < len(vocab.tokens) else None

        self.special_tokens = SpecialTokens(
            bos_token_id=vocab.bos_id, eos_token_ids=[vocab.eos_id] if vocab.eos_id is not None
            else [], pad_token_id=vocab.pad_id, unk_token_id=vocab.unk_id,
            bos_token=name(vocab.bos_id), eos_token=name(vocab.eos_id),
            pad_token=name(vocab.pad_id), unk_token=name(vocab.unk_id), add_bos_token=vocab.add_bos)
        self.generation_config = {k: v for k, v in (("bos_token_id", vocab.bos_id),
                                                    ("eos_token_id", vocab.eos_id),
                                                    ("pad_token_id", vocab.pad_id))
                                  if v is not None}

    # ------------------------------------------------------------------------------- tensors
    def tensor_names(self) -> list[str]:
        return list(self._hf_to_gguf)

    def get(self, name: str, dtype: Any = None) -> np.ndarray:
        try:
            tensor = self._tensors[self._hf_to_gguf[name]]
        except KeyError:
            raise ConvertError(f"Tensor {name!r} is not in {self.path}.") from None
        qtype = tensor.tensor_type
        # GGUF lists dims fastest-first (ne order); numpy's order is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        try:
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                array = np.array(tensor.data).reshape(shape)      # copy out of the mmap
            else:
                array = gguf.quants.dequantize(tensor.data, qtype).reshape(shape)
        except Exception as e:
            raise ConvertError(f"Corrupt GGUF tensor {tensor.name} in {self.path}: {e}") from e
        self._release_pages()
        # llama.cpp's layout and conventions -> HF's (per architecture: Llama's q/k rows...)
        array = self._info.gguf_tensor(name, array, self._config)
        if dtype is not None:
            array = array.astype(dtype, copy=False)
        return np.ascontiguousarray(array)

    def _release_pages(self) -> None:
        # The reader maps the whole file; pages read stay in the RSS while mapped. Drop them
        # (they are re-read from the page cache if needed) so RSS tracks one tensor at a time.
        mm = getattr(getattr(self._reader, "data", None), "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._tensors = {}
        self._reader = None
