"""The sampling and stopping settings of one request, as the engine and sampler see them.

Request types (`mlc.runtime.protocol`) turn into a `GenerationConfig` with `None` for every
sampling knob the user did not set; `with_defaults` then fills those from the model's
generation defaults (`mlc-chat-config.json`), and finally from neutral values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from mlc.errors import BadRequestError

if TYPE_CHECKING:
    from mlc.runtime.logit_processor import LogitProcessor

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
    prompt_logprobs: bool = False
    """Also score the prompt: the logprob of every prompt token after the first (and the
    `top_logprobs` alternatives), from the logits of every prompt position (completions'
    echo with logprobs)."""
    response_format: dict[str, Any] | None = None
    """OpenAI response_format: {"type": "text" | "json_object" | "json_schema", ...}, or mlc's
    "regex" / "grammar" (see `mlc.runtime.grammar.grammar_from_response_format`)."""
    logit_processors: list[Callable[[list[int]], LogitProcessor]] = field(default_factory=list)
    """Extra per-sequence logit processors (a grammar's mask, ...): factories called with the
    prompt's token ids when the request is submitted (a bad request raises there); n > 1
    choices fork the first choice's processors. logit_bias and the penalties add their own."""

    @property
    def is_greedy(self) -> bool:
        """Whether sampling reduces to argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1

    def check_for_model(self, vocab_size: int) -> GenerationConfig:
        """Check what only the model can tell (token ids inside its vocabulary); every other
        field was validated once, by the request's protocol type. Returns self."""
        for token_id in self.logit_bias:
            if token_id >= vocab_size:
                raise BadRequestError(f"Invalid 'logit_bias': token id {token_id} is outside "
                                      f"the vocabulary (size {vocab_size}).", param="logit_bias")
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                raise BadRequestError(f"Invalid 'stop_token_ids': {token_id} is not a token id "
                                      f"of this model (vocabulary size {vocab_size}).",
                                      param="stop_token_ids")
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

