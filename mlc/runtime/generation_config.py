"""The sampling and stopping settings of one request, as the engine and sampler see them.

Request types (`mlc.runtime.protocol`) turn into a `GenerationConfig` with `None` for every
sampling knob the user did not set; `with_defaults` then fills those from the model's
generation defaults (`mlc-chat-config.json`), and finally from neutral values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlc.errors import BadRequestError

MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRS = 16
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")

# Fields that `with_defaults` fills from the model's defaults, with the neutral value used when
# the model has none either.
_DEFAULTED_FIELDS: dict[str, float | int] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


@dataclass
class GenerationConfig:
    """How to sample and when to stop, for one request (all of its `n` choices)."""

    n: int = 1
    """Number of independent choices to generate for the prompt."""
    temperature: float | None = None
    """Softmax temperature in [0, 2]; 0 means greedy (argmax). None: the model's default."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest set of tokens whose mass reaches top_p, in (0, 1]."""
    top_k: int | None = None
    """Keep only the k most likely tokens; 0 disables; 1 is greedy."""
    presence_penalty: float | None = None
    """OpenAI presence penalty in [-2, 2], subtracted once from every token already generated."""
    frequency_penalty: float | None = None
    """OpenAI frequency penalty in [-2, 2], times the number of times a token was generated."""
    repetition_penalty: float | None = None
    """CTRL/HF repetition penalty (> 0) over prompt and output tokens; 1 disables."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> bias in [-100, 100] added to the logits before sampling."""
    logprobs: bool = False
    """Whether to return the log probability of each sampled token."""
    top_logprobs: int = 0
    """How many most likely alternatives (with logprobs) to return per token, 0..20."""
    max_tokens: int | None = None
    """Most tokens to generate per choice; None: until a stop or the context window is full."""
    seed: int | None = None
    """Seed of the per-request random generator; the same seed gives the same output."""
    stop_strs: list[str] = field(default_factory=list)
    """Strings that end generation; they are not included in the output."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (in addition to the model's EOS unless ignore_eos)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence tokens (benchmarks)."""
    response_format: dict[str, Any] | None = None
    """OpenAI response_format: {"type": "text" | "json_object" | "json_schema", ...}, or mlc's
    "regex" / "grammar" (see `mlc.runtime.grammar.grammar_from_response_format`)."""

    @property
    def is_greedy(self) -> bool:
        """Whether sampling reduces to argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> GenerationConfig:
        """Check every field; raise `BadRequestError` naming the first bad one. Returns self."""
        def bad(param: str, message: str) -> BadRequestError:
            return BadRequestError(f"Invalid '{param}': {message}", param=param)

        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}.")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise bad("temperature", f"must be in [0, 2], got {self.temperature}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}.")
        if self.top_k is not None and self.top_k < 0:
            raise bad("top_k", f"must be >= 0 (0 disables it), got {self.top_k}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= value <= 2:
                raise bad(name, f"must be in [-2, 2], got {value}.")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}.")
        for token_id, bias in self.logit_bias.items():
            if not isinstance(token_id, int) or token_id < 0:
                raise bad("logit_bias", f"keys must be token ids (integers >= 0), got {token_id!r}.")
            if vocab_size is not None and token_id >= vocab_size:
                raise bad("logit_bias", f"token id {token_id} is outside the vocabulary "
                                        f"(size {vocab_size}).")
            if not -100 <= bias <= 100:
                raise bad("logit_bias", f"values must be in [-100, 100], got {bias} "
                                        f"for token {token_id}.")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], "
                                      f"got {self.top_logprobs}.")
        if self.top_logprobs > 0 and not self.logprobs:
            raise bad("top_logprobs", "requires 'logprobs' to be true.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"must be >= 1, got {self.max_tokens}.")
        if len(self.stop_strs) > MAX_STOP_STRS:
            raise bad("stop", f"at most {MAX_STOP_STRS} stop strings are allowed, "
                              f"got {len(self.stop_strs)}.")
        if any(not isinstance(s, str) or s == "" for s in self.stop_strs):
            raise bad("stop", "stop strings must be non-empty strings.")
        for token_id in self.stop_token_ids:
            if not isinstance(token_id, int) or token_id < 0 or (
                    vocab_size is not None and token_id >= vocab_size):
                raise bad("stop_token_ids", f"{token_id!r} is not a token id of this model.")
        if self.response_format is not None:
            kind = self.response_format.get("type", "text")
            if kind not in RESPONSE_FORMAT_TYPES:
                raise bad("response_format", f"type must be one of {RESPONSE_FORMAT_TYPES}, "
                                             f"got {kind!r}.")
            if kind == "json_schema" and not _schema_of(self.response_format):
                raise bad("response_format", "type 'json_schema' needs a 'json_schema' "
                                             "object with a 'schema'.")
        return self

    def with_defaults(self, chat_config_defaults: Any = None) -> GenerationConfig:
        """A copy where unset (None) sampling fields come from the model's defaults.

        `chat_config_defaults` is a dict (or an object such as `ChatConfig`) with any of
        temperature, top_p, top_k, repetition_penalty, presence_penalty, frequency_penalty.
        Fields still unset afterwards get neutral values (temperature 1, top_p 1, no top_k,
        no penalties), so the result has no None sampling fields.
        """
        defaults = chat_config_defaults or {}
        updates = {}
        for name, neutral in _DEFAULTED_FIELDS.items():
            if getattr(self, name) is not None:
                continue
            value = (defaults.get(name) if isinstance(defaults, dict)
                     else getattr(defaults, name, None))
            updates[name] = neutral if value is None else type(neutral)(value)
        return dataclasses.replace(self, **updates)


def _schema_of(response_format: dict[str, Any]) -> Any:
    """The JSON schema inside an OpenAI response_format (or MLC-LLM's top-level 'schema')."""
    json_schema = response_format.get("json_schema") or {}
    return json_schema.get("schema") or response_format.get("schema")
