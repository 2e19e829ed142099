"""Embeddings: a generative model's pooled final hidden states (OpenAI's /v1/embeddings).

    engine.embeddings.create(input=["first text", "second text"])       # MLCEngine
    await engine.embeddings.create(input=[[1, 2, 3]], extra_body={"pooling": "mean"})

The embedding of an input is the model's final (normed) hidden states over its tokens,
pooled, then L2-normalised, as vLLM and llama.cpp serve generative models:

- "last" (the default): the last token's hidden state, the only one that attends to the
  whole input in a causal model. It is vLLM's default for decoder-only models, and the
  pooling that decoder embedding models of architectures mlc runs (Qwen3-Embedding,
  gte-Qwen2, e5-mistral) are trained with.
- "mean": the average over all tokens, often the better choice for a chat model never trained
  for embeddings.

Pick it per engine (`embedding_pooling=`, `mlc serve --embedding-pooling`) or per request
(the `pooling` field, `extra_body={"pooling": "mean"}` with the openai client).
`dimensions` keeps the first `dimensions` features and normalises again (OpenAI's shortened
embeddings); `encoding_format="base64"` sends the float32 bytes (little-endian) as base64.

How it runs: the engine loop runs embedding work between generation steps (`EmbeddingQueue`,
one batch of inputs per step, batched across requests: as many inputs as fit one prefill
chunk and the batch size; a longer input runs alone, in chunks). Each input is a temporary
sequence of the paged KV cache that enters and leaves it within that step, through the
library's `batch_prefill_hidden_states`, so generation never sees it. Its pages are free
pages (the scheduler evicts cached prefixes for them, it never preempts a request): while
running requests hold the cache, inputs wait for them.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from mlc.errors import BadRequestError, ContextWindowExceededError, MLCError, ModelLoadError
from mlc.runtime.protocol import TopLevelRequest, random_id

logger = logging.getLogger(__name__)

POOLING_MODES = ("last", "mean")
DEFAULT_POOLING = "last"


# ---------------------------------------------------------------------------------------------
# Protocol


class EmbeddingRequest(TopLevelRequest):
    """POST /v1/embeddings: OpenAI's fields, then mlc's `pooling` and `request_id`.

    `input` is a string, a list of strings, a list of token ids, or a list of lists of
    token ids (one embedding per string or per list).
    """

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # mlc extensions
    pooling: Literal["last", "mean"] | None = None
    request_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_input_field(cls, data: Any) -> Any:
        # (a model validator: its errors keep their own param, e.g. "input[1]")
        if isinstance(data, dict) and "input" in data:
            data = {**data, "input": cls._check_input(data["input"])}
        return data

    @staticmethod
    def _check_input(value: Any) -> Any:
        if isinstance(value, str):
            return _non_empty_text(value, "input")
        if not isinstance(value, list) or not value:
            raise BadRequestError("Invalid 'input': give a non-empty string, a list of "
                                  "strings, a list of token ids or a list of such lists.",
                                  param="input")
        if all(_is_token(t) for t in value):
            return _token_list(value, "input")
        if all(isinstance(t, str) for t in value):
            return [_non_empty_text(t, f"input[{i}]") for i, t in enumerate(value)]
        if all(isinstance(t, list) for t in value):
            return [_token_list(t, f"input[{i}]") for i, t in enumerate(value)]
        raise BadRequestError("Invalid 'input': a list must hold only strings, only token "
                              "ids, or only lists of token ids.", param="input")

    def inputs(self) -> list[str | list[int]]:
        """One entry per embedding: a text or a list of token ids."""
        if isinstance(self.input, str) or (self.input and _is_token(self.input[0])):
            return [self.input]
        return list(self.input)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _non_empty_text(text: str, param: str) -> str:
    if not text:
        raise BadRequestError(f"Invalid '{param}': the input must not be an empty string.",
                              param=param)
    return text


def _token_list(tokens: list, param: str) -> list[int]:
    if not tokens:
        raise BadRequestError(f"Invalid '{param}': the list of token ids must not be empty.",
                              param=param)
    if not all(_is_token(t) and t >= 0 for t in tokens):
        raise BadRequestError(f"Invalid '{param}': token ids must be integers >= 0.",
                              param=param)
    return tokens


def parse_embedding_request(data: Any = None, **kwargs: Any) -> EmbeddingRequest:
    """Validate an embeddings request given as a dict and/or keyword arguments (top-level
    None values mean "not given"); problems raise `BadRequestError` naming the field."""
    if isinstance(data, EmbeddingRequest) and not kwargs:
        return data
    if isinstance(data, BaseModel):
        data = data.model_dump(exclude_unset=True)
    merged = {k: v for k, v in {**(data or {}), **kwargs}.items() if v is not None}
    req = EmbeddingRequest.model_validate(merged)
    if req.request_id is None:
        req.request_id = random_id("embd-")
    return req


class Embedding(BaseModel):
    """One input's embedding: a list of floats, or base64 of its float32 bytes."""

    embedding: list[float] | str
    index: int
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(BaseModel):
    """OpenAI's embeddings response (the `openai` package's `CreateEmbeddingResponse`)."""

    data: list[Embedding]
    model: str
    object: Literal["list"] = "list"
    usage: EmbeddingUsage


# ---------------------------------------------------------------------------------------------
# Pooling


def normalize(vector: np.ndarray) -> np.ndarray:
    """vector / ||vector|| in float32 (a zero vector stays zero)."""
    vector = np.asarray(vector, dtype=np.float64)
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


class _Pooler:
    """Pools one input whose hidden states arrive chunk by chunk."""

    def __init__(self, mode: str, hidden_size: int):
        self.mode = mode
        self.total = np.zeros(hidden_size, dtype=np.float64)
        self.count = 0
        self.last: np.ndarray | None = None

    def add(self, hidden: np.ndarray) -> None:
        self.total += hidden.sum(axis=0, dtype=np.float64)
        self.count += len(hidden)
        self.last = hidden[-1]

    def result(self) -> np.ndarray:
        return normalize(self.last if self.mode == "last" else self.total / self.count)


# ---------------------------------------------------------------------------------------------
# The work the engine loop runs


@dataclass
class EmbeddingJob:
    """One request's inputs as token ids; `future` gets their embeddings (in order)."""

    token_lists: list[list[int]]
    pooling: str
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    results: dict[int, np.ndarray] = field(default_factory=dict)

    def deliver(self, index: int, vector: np.ndarray) -> None:
        self.results[index] = vector
        if len(self.results) == len(self.token_lists):
            _settle(self.future, lambda f: f.set_result(
                [self.results[i] for i in range(len(self.token_lists))]))

    def fail(self, error: BaseException) -> None:
        _settle(self.future, lambda f: f.set_exception(error))


def _settle(future: concurrent.futures.Future, action: Callable) -> None:
    """Complete `future` unless its caller cancelled it meanwhile."""
    try:
        if not future.done():
            action(future)
    except concurrent.futures.InvalidStateError:    # cancelled between the check and now
        pass


@dataclass
class _Item:
    job: EmbeddingJob
    index: int

    @property
    def tokens(self) -> list[int]:
        return self.job.token_lists[self.index]


class EmbeddingQueue:
    """Embedding inputs waiting for the engine loop, and the step that runs a batch of them.

    Used on the loop thread only. `runner` is the ModelRunner (`prefill_hidden_states`,
    add/remove_sequence, page_size, total_pages); `scheduler` gives fresh sequence ids and
    frees pages by evicting cached prefixes (`new_seq_id`, `reserve_pages`, `has_work`).
    """

    def __init__(self, runner, scheduler, max_batch_size: int, prefill_chunk_size: int,
                 hidden_size: int):
        self.runner, self.scheduler = runner, scheduler
        self.max_batch_size, self.chunk = max_batch_size, prefill_chunk_size
        self.hidden_size = hidden_size
        self.items: collections.deque[_Item] = collections.deque()

    def add(self, job: EmbeddingJob) -> None:
        self.items.extend(_Item(job, i) for i in range(len(job.token_lists)))

    def has_work(self) -> bool:
        return bool(self.items)

    def fail_all(self, error: BaseException) -> None:
        for item in self.items:
            item.job.fail(error)
        self.items.clear()

    def step(self) -> None:
        """Embed the next batch of inputs (nothing when their pages are not free yet); a
        failure fails the waiting embedding requests, never the engine loop."""
        try:
            self._step()
        except Exception as e:  # noqa: BLE001 - e.g. the KV cache refused a sequence
            logger.exception("embedding step failed")
            self.fail_all(MLCError(f"Internal engine error while computing embeddings: {e!r}"))

    def _step(self) -> None:
        while self.items and self.items[0].job.future.done():     # cancelled by the caller
            self.items.popleft()
        if not self.items:
            return
        batch = self._next_batch()
        if not self.scheduler.reserve_pages(self._pages(batch)):
            if len(batch) > 1 and self.scheduler.reserve_pages(self._pages(batch[:1])):
                batch = batch[:1]
            elif self.scheduler.has_work():
                return                      # running requests hold the pages: wait
            else:
                self._refuse(batch[0])
                return
        for _ in batch:
            self.items.popleft()
        try:
            vectors = self._run(batch)
        except Exception as e:  # noqa: BLE001 - fail these inputs' requests, keep the loop
            logger.exception("embedding step failed")
            err = e if isinstance(e, MLCError) else MLCError(
                f"Internal engine error while computing embeddings: {e!r}")
            for item in batch:
                item.job.fail(err)
            return
        for item, vector in zip(batch, vectors):
            item.job.deliver(item.index, vector)

    def _next_batch(self) -> list[_Item]:
        """The first waiting input, and those after it that fit one prefill chunk together."""
        batch, total = [self.items[0]], len(self.items[0].tokens)
        for item in list(self.items)[1:]:
            if len(batch) >= self.max_batch_size or total + len(item.tokens) > self.chunk:
                break
            if item.job.future.done():
                break
            batch.append(item)
            total += len(item.tokens)
        return batch

    def _pages(self, batch: list[_Item]) -> int:
        page = self.runner.page_size
        return sum(-(-len(item.tokens) // page) for item in batch)

    def _refuse(self, item: _Item) -> None:
        """An input the whole KV cache cannot hold: its request fails (400). (A guard: the
        memory plan keeps the context window within the cache, and longer inputs are
        refused before they are queued.)"""
        self.items.popleft()
        needed, total = self._pages([item]), self.runner.total_pages
        item.job.fail(BadRequestError(
            f"An input of {len(item.tokens)} tokens needs {needed} KV-cache pages and the "
            f"cache has {total}: shorten it, or start the engine with a larger "
            "max_total_sequence_length.", param="input"))
        self.items = collections.deque(i for i in self.items if i.job is not item.job)

    def _run(self, batch: list[_Item]) -> list[np.ndarray]:
        """Each input of `batch` through temporary KV sequences, chunk by chunk (only a
        lone input is longer than a chunk); the pooled, normalised vectors."""
        seq_ids = [self.scheduler.new_seq_id() for _ in batch]
        poolers = [_Pooler(item.job.pooling, self.hidden_size) for item in batch]
        added = []
        try:
            for seq_id in seq_ids:
                self.runner.add_sequence(seq_id)
                added.append(seq_id)
            longest = max(len(item.tokens) for item in batch)
            for start in range(0, longest, self.chunk):
                live = [i for i, item in enumerate(batch) if len(item.tokens) > start]
                pieces = [batch[i].tokens[start:start + self.chunk] for i in live]
                hidden = self.runner.prefill_hidden_states([seq_ids[i] for i in live], pieces)
                offset = 0
                for i, piece in zip(live, pieces):
                    poolers[i].add(hidden[offset:offset + len(piece)])
                    offset += len(piece)
        finally:
            for seq_id in added:
                self.runner.remove_sequence(seq_id)
        return [p.result() for p in poolers]


# ---------------------------------------------------------------------------------------------
# The engine's `embeddings` namespace


def prepare_job(req: EmbeddingRequest, encode: Callable[[str], list[int]], vocab_size: int,
                context_window: int, default_pooling: str) -> EmbeddingJob:
    """The request's inputs as token ids, checked against the model (vocabulary, context)."""
    token_lists = []
    for i, entry in enumerate(req.inputs()):
        param = "input" if len(req.inputs()) == 1 else f"input[{i}]"
        ids = encode(entry) if isinstance(entry, str) else list(entry)
        if any(t >= vocab_size for t in ids):
            raise BadRequestError(f"Invalid '{param}': token ids must be < the vocabulary "
                                  f"size {vocab_size}.", param=param)
        if len(ids) > context_window:
            raise ContextWindowExceededError(
                f"This model's maximum context length is {context_window} tokens, however you "
                f"requested {len(ids)} tokens ({len(ids)} in your prompt; 0 for the "
                "completion). Please reduce your prompt; or completion length.", param=param)
        token_lists.append(ids)
    return EmbeddingJob(token_lists, req.pooling or default_pooling)


def build_response(req: EmbeddingRequest, job: EmbeddingJob, vectors: list[np.ndarray],
                   model_id: str) -> CreateEmbeddingResponse:
    """OpenAI's response for the pooled vectors (`dimensions`, `encoding_format`)."""
    data = []
    for index, vector in enumerate(vectors):
        if req.dimensions is not None:
            vector = normalize(vector[:req.dimensions])
        vector = vector.astype("<f4")
        encoded = (base64.b64encode(vector.tobytes()).decode("ascii")
                   if req.encoding_format == "base64" else vector.tolist())
        data.append(Embedding(embedding=encoded, index=index))
    tokens = sum(len(t) for t in job.token_lists)
    return CreateEmbeddingResponse(data=data, model=model_id,
                                   usage=EmbeddingUsage(prompt_tokens=tokens,
                                                        total_tokens=tokens))


class _EmbeddingsBase:
    """What both engines' `embeddings` share: `start(request)` validates and submits."""

    def __init__(self, start: Callable[[Any], tuple[EmbeddingRequest, EmbeddingJob]],
                 respond: Callable[[EmbeddingRequest, EmbeddingJob, list], Any]):
        self._start, self._respond = start, respond

    def _begin(self, request: Any, kwargs: dict[str, Any]):
        if request is None:
            extra = kwargs.pop("extra_body", None) or {}
            if not isinstance(extra, dict):
                raise BadRequestError("extra_body must be a dict of request fields.",
                                      param="extra_body")
            request = {**kwargs, **extra}
        return self._start(request)


class SyncEmbeddings(_EmbeddingsBase):
    """`MLCEngine.embeddings`."""

    def create(self, request: EmbeddingRequest | None = None, /,
               **kwargs: Any) -> CreateEmbeddingResponse:
        """OpenAI's `embeddings.create(input=..., model=..., encoding_format=..., dimensions=...,
        user=...)`; `extra_body={"pooling": "mean"}` picks the pooling of this request."""
        req, job = self._begin(request, kwargs)
        return self._respond(req, job, job.future.result())


class AsyncEmbeddings(_EmbeddingsBase):
    """`AsyncMLCEngine.embeddings`."""

    async def create(self, request: EmbeddingRequest | None = None, /,
                     **kwargs: Any) -> CreateEmbeddingResponse:
        """`await engine.embeddings.create(...)`, as `MLCEngine.embeddings.create`."""
        req, job = self._begin(request, kwargs)
        return self._respond(req, job, await asyncio.wrap_future(job.future))


def check_pooling(mode: str) -> str:
    """An engine's default pooling, checked."""
    if mode not in POOLING_MODES:
        raise ModelLoadError(f"embedding_pooling must be one of {POOLING_MODES}, got "
                             f"{mode!r}.", param="embedding_pooling")
    return mode


__all__ = ["EmbeddingRequest", "CreateEmbeddingResponse", "Embedding", "EmbeddingQueue",
           "EmbeddingJob", "normalize", "POOLING_MODES", "DEFAULT_POOLING"]
