"""What flows through the engine core: requests, their sequences (one per choice), and the
outputs a step hands back to the caller.

These are plain data objects: the Scheduler, the step actions and the OutputProcessor all
read and write their public fields; none of them keeps private state on another's objects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from mlc.runtime.detokenizer import IncrementalDetokenizer, StopStringMatcher
from mlc.runtime.generation_config import GenerationConfig
from mlc.runtime.logit_processor import LogitProcessor
from mlc.runtime.sampler import make_generator


@dataclass(frozen=True)
class EngineLimits:
    """The sizes an engine runs with (from the memory plan)."""

    max_batch_size: int
    max_total_sequence_length: int
    prefill_chunk_size: int
    context_window_size: int


@dataclass
class TokenLogprob:
    """A generated token's log probability and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class ChoiceDelta:
    """What one choice produced in one step (any number of tokens)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """One step's output for a request; `final` once every choice has finished."""

    request_id: str
    deltas: list[ChoiceDelta]
    final: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None
    cached_tokens: int = 0
    """Prompt tokens whose KV entries came from the prefix cache (not computed)."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With `prompt_logprobs` set: each prompt token's logprob (None for the first), in the
    request's first output."""


class OutputSink(Protocol):
    """Where a request's outputs go (called on the engine thread, once per step at most).

    A sink may also have a `flush` attribute, a callable that hands on what it was given so
    far (sinks feeding one event loop share one, to wake it once for all of them). The engine
    core then calls each distinct `flush` once per step: on a GPU after it launched the next
    step, so the consumers' work overlaps the device's (`EngineCore.step`)."""

    def __call__(self, out: RequestOutput) -> None: ...


class Request:
    """A submitted request: its prompt, settings, choices and where its outputs go.

    The first choice's logit processors are built here, in the submitting thread, so a
    processor that refuses the request raises before anything is queued.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], config: GenerationConfig,
                 tokenizer, stop_ids: set[int], sink: OutputSink,
                 processor_factories: list[Callable[[list[int]], LogitProcessor]] = ()):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.config = config
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.sink = sink
        self.first_processors = [make(self.prompt_ids) for make in processor_factories]
        self.seqs: list[Sequence] = []
        self.forked = False                 # the n - 1 other choices exist
        self.cached_tokens = 0              # prompt tokens reused from the prefix cache
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None   # filled by prefill
        self._prompt_logprobs_sent = False

    @property
    def finished(self) -> bool:
        return bool(self.seqs) and all(s.finish_reason for s in self.seqs)

    @property
    def num_generated(self) -> int:
        return sum(s.num_generated for s in self.seqs)

    def output(self, deltas: list[ChoiceDelta]) -> RequestOutput:
        """This step's output of the request, with its token counts."""
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self._prompt_logprobs_sent:
            prompt_logprobs, self._prompt_logprobs_sent = self.prompt_logprobs, True
        return RequestOutput(self.request_id, deltas, self.finished, len(self.prompt_ids),
                             self.num_generated, prompt_logprobs=prompt_logprobs,
                             cached_tokens=self.cached_tokens)


class Sequence:
    """One choice of a request: its tokens, KV-cache state and decoding state."""

    def __init__(self, seq_id: int, index: int, request: Request,
                 processors: list[LogitProcessor]):
        self.seq_id = seq_id
        self.index = index
        self.request = request
        self.tokens = list(request.prompt_ids)  # everything that belongs in the KV cache
        self.num_cached = 0                     # how many of `tokens` the KV cache holds
        self.in_cache = False                   # whether the KV cache knows this sequence
        self.num_generated = 0
        self.finish_reason: str | None = None
        self.processors = processors
        self.detok = IncrementalDetokenizer(request.tokenizer, request.prompt_ids)
        self.stop = StopStringMatcher(request.config.stop_strs)
        self.rng = make_generator(request.config.seed, index)
        self.last_token_time: float | None = None

    @property
    def pending(self) -> int:
        """Tokens not yet in the KV cache."""
        return len(self.tokens) - self.num_cached

    @property
    def config(self) -> GenerationConfig:
        return self.request.config

    def fork(self, seq_id: int, index: int) -> Sequence:
        """Choice `index` of the same request, sharing this one's prompt (after prefill)."""
        child = Sequence(seq_id, index, self.request, [p.fork() for p in self.processors])
        child.num_cached = self.num_cached
        return child


@dataclass
class StepCounters:
    """Cumulative work of the engine loop (read through `engine.stats()`)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    preemptions: int = 0
    prefix_cached_tokens: int = 0       # tokens admitted as forks of cached prefixes
    prefix_evictions: int = 0
    draft_tokens: int = 0               # speculative tokens proposed
    accepted_draft_tokens: int = 0      # of those, accepted by the target
    finished_requests: dict[str, int] = field(default_factory=dict)
