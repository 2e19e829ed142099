"""`mlc-chat-config.json`: everything the runtime needs to know about a converted model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlc.errors import ModelLoadError

CHAT_CONFIG_NAME = "mlc-chat-config.json"


@dataclass
class ChatConfig:
    """The contents of `mlc-chat-config.json` (MLC-LLM's field names where they exist)."""

    model_type: str                      # registry key, e.g. "llama"
    quantization: str                    # e.g. "q4f16_1"
    model_config: dict[str, Any]         # the architecture config (HF config.json fields)
    vocab_size: int
    context_window_size: int
    prefill_chunk_size: int
    sliding_window_size: int = -1        # -1: no sliding window
    attention_sink_size: int = 0
    tensor_parallel_shards: int = 1
    # tokenizer / template
    tokenizer_files: list[str] = field(default_factory=list)
    chat_template: str | None = None     # HF jinja2 template, when the source has one
    conv_template: Any = None            # MLC-LLM conversation template (name or dict), read too
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False
    # generation defaults (generation_config.json)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int | None = None
    # provenance
    source: str | None = None
    version: str = "0.1.0"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False)

    def save(self, directory: str | Path) -> None:
        Path(directory, CHAT_CONFIG_NAME).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatConfig:
        """Build from a dict, accepting MLC-LLM's own mlc-chat-config.json too."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        if isinstance(data.get("eos_token_id"), int):
            data["eos_token_id"] = [data["eos_token_id"]]
        missing = [k for k in ("model_type", "quantization", "model_config") if k not in data]
        if missing:
            raise ModelLoadError(
                f"mlc-chat-config.json lacks {missing}; re-create the model dir with `mlc convert`.")
        cfg = data["model_config"]
        data.setdefault("vocab_size", cfg.get("vocab_size"))
        data.setdefault("context_window_size", cfg.get("context_window_size")
                        or cfg.get("max_position_embeddings", 4096))
        data.setdefault("prefill_chunk_size", cfg.get("prefill_chunk_size")
                        or min(2048, data["context_window_size"]))
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> ChatConfig:
        """Load from a model dir or a path to mlc-chat-config.json."""
        path = Path(path)
        file = path if path.is_file() else path / CHAT_CONFIG_NAME
        if not file.exists():
            raise ModelLoadError(
                f"{file} not found: {path} is not an MLC model dir. "
                f"Create one with `mlc convert SOURCE --quantization q4f16_1 -o {path}`.")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{file} is not valid JSON ({e}); re-run `mlc convert`.") from e
        return cls.from_dict(data)
