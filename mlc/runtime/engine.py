"""`MLCEngine` and `AsyncMLCEngine`: MLC-LLM's API, OpenAI's request and response shapes.

Both wrap one `EngineCore` (the loop thread). Everything about a request except how its
outputs are waited for lives in `_EngineBase`: parsing and validation, the prompt, the
response objects. The sync engine waits on a `queue.Queue`, the async one on an asyncio queue
fed thread-safely.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from mlc.errors import (
    BadRequestError,
    ContextWindowExceededError,
    EngineTerminatedError,
    ModelLoadError,
)
from mlc.runtime import protocol as P
from mlc.runtime.chat_template import parse_tool_calls, render_chat
from mlc.runtime.device import parse_runtime_device
from mlc.runtime.engine_core import EngineCore, EngineLimits, Request, RequestOutput
from mlc.runtime.generation_config import GenerationConfig
from mlc.runtime.memory_plan import plan_memory
from mlc.runtime.model import KVCacheConfig, LoadedModel
from mlc.runtime.model_source import resolve_model
from mlc.runtime.tracing import Tracer
from mlc.support.tensor_cache import numpy_dtype

logger = logging.getLogger(__name__)
SPECULATIVE_MODES = ("disable", "small_draft", "eagle")


@dataclass
class EngineConfig:
    """MLC-LLM's `EngineConfig`: the same fields may be given as constructor keywords."""

    model: str | None = None
    model_lib: str | None = None
    additional_models: list[Any] = field(default_factory=list)
    mode: str | None = None
    max_batch_size: int | None = None
    max_total_sequence_length: int | None = None
    prefill_chunk_size: int | None = None
    max_history_size: int | None = None
    gpu_memory_utilization: float | None = None
    speculative_mode: str = "disable"
    spec_draft_length: int = 0
    verbose: bool = False


class _EngineBase:
    """Loading, request preparation and response building shared by both engines."""

    def __init__(self, model: str, device: str = "auto", *, model_lib: str | None = None,
                 mode: str = "local", engine_config: EngineConfig | None = None,
                 additional_models: list | None = None, max_batch_size: int | None = None,
                 max_total_sequence_length: int | None = None,
                 prefill_chunk_size: int | None = None, max_history_size: int | None = None,
                 gpu_memory_utilization: float | None = None,
                 speculative_mode: str = "disable", spec_draft_length: int | None = None,
                 enable_tracing: bool = False, verbose: bool = False):
        cfg = engine_config or EngineConfig()
        pick = lambda given, from_cfg: given if given is not None else from_cfg
        self.model_arg = str(model)
        self.mode = cfg.mode or mode
        speculative_mode = cfg.speculative_mode if engine_config else speculative_mode
        if speculative_mode not in SPECULATIVE_MODES:
            raise ModelLoadError(f"speculative_mode must be one of {SPECULATIVE_MODES}, got "
                                 f"{speculative_mode!r}.", param="speculative_mode")
        if speculative_mode != "disable":
            raise ModelLoadError(
                f"speculative_mode={speculative_mode!r} is not implemented in mlc yet; use "
                "speculative_mode='disable'.", param="speculative_mode")
        self.additional_models = additional_models or cfg.additional_models
        self.max_history_size = pick(max_history_size, cfg.max_history_size)
        self.spec_draft_length = pick(spec_draft_length, cfg.spec_draft_length)
        self.verbose = verbose or cfg.verbose
        kind, dev = parse_runtime_device(device)
        self.model_dir = resolve_model(model, quiet=not self.verbose, device_kind=kind)
        model_lib = pick(model_lib, cfg.model_lib)
        if model_lib is None:
            from mlc.runtime.jit import find_or_build_library

            model_lib = find_or_build_library(self.model_dir, kind, dev,
                                              quiet=not self.verbose)
        t0 = time.perf_counter()
        self.model = LoadedModel(self.model_dir, model_lib, device)
        self.chat_config = self.model.chat_config
        weight_bytes = sum(p.numel() * numpy_dtype(str(p.dtype)).itemsize
                           for p in self.model.params)
        self.plan = plan_memory(
            self.model.metadata, weight_bytes, self.model.device, self.mode,
            pick(max_batch_size, cfg.max_batch_size),
            pick(max_total_sequence_length, cfg.max_total_sequence_length),
            pick(prefill_chunk_size, cfg.prefill_chunk_size),
            pick(gpu_memory_utilization, cfg.gpu_memory_utilization))
        if self.verbose:
            logger.warning("loaded %s (%s) on %s in %.1fs\n%s", self.model_dir,
                           self.model.lib_path, self.model.device_kind,
                           time.perf_counter() - t0, self.plan.describe())
        self.model.create_kv_cache(KVCacheConfig(
            self.plan.max_batch_size, self.plan.max_total_sequence_length,
            self.plan.prefill_chunk_size))
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.tracer = Tracer(enabled=enable_tracing)
        self.core = EngineCore(self.model, EngineLimits(
            self.plan.max_batch_size, self.plan.max_total_sequence_length,
            self.plan.prefill_chunk_size, self.plan.context_window_size), self.tracer)
        self.model_name = self.model_arg
        self._terminated = False

    # -- lifecycle -------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._terminated or not self.core.alive:
            raise EngineTerminatedError(
                "This engine has been terminated; create a new MLCEngine to run requests.")

    def terminate(self) -> None:
        """Stop the engine loop and free the model and its KV cache."""
        if not self._terminated:
            self._terminated = True
            self.core.shutdown()
            self.model.kv_cache = None
            self.model.params = []

    def abort(self, request_id: str) -> None:
        """End a request early; its streams finish with finish_reason "abort"."""
        self.core.abort(request_id)

    def save_trace(self, path: str | Path) -> Path:
        """Write the Chrome trace of the requests so far (needs enable_tracing=True)."""
        return self.tracer.save(path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.terminate()

    def __del__(self):
        try:
            self.terminate()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- requests --------------------------------------------------------------------------
    def _check_model_field(self, name: str | None) -> None:
        if name in (None, "", self.model_arg, str(self.model_dir), self.model_dir.name):
            return
        raise BadRequestError(f"The model {name!r} does not exist: this engine serves "
                              f"{self.model_arg!r}.", param="model", code="model_not_found")

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.chat_config.bos_token_id
        if self.chat_config.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def _finish_config(self, gen: GenerationConfig, prompt_len: int) -> GenerationConfig:
        gen = gen.with_defaults(self.chat_config).validate(self.model.vocab_size)
        if gen.response_format and gen.response_format.get("type", "text") != "text":
            raise BadRequestError(
                f"response_format type {gen.response_format['type']!r} needs grammar-"
                "constrained decoding, which this mlc build does not support yet; the request "
                "was refused rather than answered unconstrained.", param="response_format")
        if gen.n > self.plan.max_batch_size:   # would never be admitted
            raise BadRequestError(
                f"Invalid 'n': {gen.n} choices exceed this engine's max_batch_size "
                f"{self.plan.max_batch_size}; lower n or raise max_batch_size.", param="n")
        ctx = self.plan.context_window_size
        if prompt_len >= ctx:
            raise ContextWindowExceededError(
                f"The prompt has {prompt_len} tokens but the context window is {ctx}: shorten "
                "the messages (or raise context_window_size when compiling).")
        if prompt_len + 1 > self.plan.max_total_sequence_length:
            raise ContextWindowExceededError(
                f"The prompt has {prompt_len} tokens but the KV cache holds "
                f"{self.plan.max_total_sequence_length}: raise max_total_sequence_length.")
        if gen.max_tokens is not None and prompt_len + gen.max_tokens > ctx:
            raise ContextWindowExceededError(
                f"prompt ({prompt_len} tokens) + max_tokens ({gen.max_tokens}) exceeds the "
                f"context window of {ctx} tokens: lower max_tokens or shorten the prompt.",
                param="max_tokens")
        return gen

    def _prepare_chat(self, kwargs: dict[str, Any]):
        req = P.parse_chat_request(kwargs)
        self._check_model_field(req.model)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        prompt = render_chat(self.chat_config, req.messages,
                             tools=req.tools if use_tools else None)
        ids = self._encode(prompt)
        gen = self._finish_config(req.to_generation_config(), len(ids))
        return req, ids, gen, use_tools

    def _prepare_completion(self, kwargs: dict[str, Any]):
        req = P.parse_completion_request(kwargs)
        self._check_model_field(req.model)
        prompt = req.prompt
        ids = list(prompt) if isinstance(prompt, list) else self._encode(prompt)
        if any(t >= self.model.vocab_size for t in ids):
            raise BadRequestError("prompt token ids must be < the vocabulary size "
                                  f"{self.model.vocab_size}.", param="prompt")
        gen = self._finish_config(req.to_generation_config(), len(ids))
        return req, ids, gen

    def _submit(self, request_id: str, ids: list[int], gen: GenerationConfig):
        """Hand a request to the loop; its outputs arrive on the returned stream."""
        stream = self._stream_class()
        self.core.submit(Request(request_id, ids, gen, self.tokenizer,
                                 self.chat_config.eos_token_id or [], stream))
        return stream

    def _start_chat(self, kwargs: dict[str, Any]) -> _Pending:
        self._check_alive()
        req, ids, gen, use_tools = self._prepare_chat(kwargs)
        rid, created = req.request_id or P.random_id("chatcmpl-"), int(time.time())
        state = {"started": set(), "text": {}}
        return _Pending(rid, self._submit(rid, ids, gen), req.stream,
                        lambda out: self._chat_chunks(req, out, rid, created, state, use_tools),
                        lambda outs: self._chat_response(req, outs, rid, created, use_tools))

    def _start_completion(self, kwargs: dict[str, Any]) -> _Pending:
        self._check_alive()
        req, ids, gen = self._prepare_completion(kwargs)
        rid, created = req.request_id or P.random_id("cmpl-"), int(time.time())
        prompt_text = self._prompt_text(req) if req.echo else ""
        state = {"started": set(), "offsets": {}, "prompt": prompt_text}
        return _Pending(rid, self._submit(rid, ids, gen), req.stream,
                        lambda out: self._completion_chunks(req, out, rid, created, state),
                        lambda outs: self._completion_response(req, outs, rid, created,
                                                               prompt_text))

    # -- response shapes -------------------------------------------------------------------
    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, delta) -> P.ChoiceLogprobs | None:
        if delta.logprobs is None:
            return None
        def top(token_id: int, logprob: float) -> P.TopLogprob:
            tok = self._token_str(token_id)
            return P.TopLogprob(token=tok, logprob=logprob, bytes=list(tok.encode()))

        entries = []
        for lp in delta.logprobs:
            chosen = top(lp.token_id, lp.logprob)
            entries.append(P.ChatCompletionTokenLogprob(
                token=chosen.token, bytes=chosen.bytes, logprob=lp.logprob,
                top_logprobs=[top(t, v) for t, v in lp.top]))
        return P.ChoiceLogprobs(content=entries)

    def _completion_logprobs(self, delta, offset: int) -> P.CompletionLogprobs | None:
        if delta.logprobs is None:
            return None
        toks = [self._token_str(lp.token_id) for lp in delta.logprobs]
        offsets, pos = [], offset
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        return P.CompletionLogprobs(
            tokens=toks, token_logprobs=[lp.logprob for lp in delta.logprobs], text_offset=offsets,
            top_logprobs=[{self._token_str(t): v for t, v in lp.top} for lp in delta.logprobs])

    @staticmethod
    def _usage(out: RequestOutput) -> P.CompletionUsage:
        return P.CompletionUsage(prompt_tokens=out.prompt_tokens,
                                 completion_tokens=out.completion_tokens,
                                 total_tokens=out.prompt_tokens + out.completion_tokens)

    def _chat_chunks(self, req, out: RequestOutput, rid: str, created: int, state: dict,
                     use_tools: bool) -> list[P.ChatCompletionChunk]:
        """The stream chunks for one engine output (tool-call choices are held to the end)."""
        choices = []
        for d in out.deltas:
            first = d.index not in state["started"]
            state["started"].add(d.index)
            text = d.text
            tool_calls = None
            reason = d.finish_reason
            if use_tools:
                state["text"][d.index] = state["text"].get(d.index, "") + text
                text = ""
                if reason:
                    calls = parse_tool_calls(state["text"][d.index], req.tools)
                    if calls:
                        tool_calls = [P.ChoiceDeltaToolCall(
                            index=i, id=c["id"], type="function",
                            function=P.ChoiceDeltaFunctionCall(**c["function"]))
                            for i, c in enumerate(calls)]
                        reason = "tool_calls"
                    else:
                        text = state["text"][d.index]
            if not (text or first or reason or tool_calls or d.logprobs):
                continue
            choices.append(P.ChunkChoice(
                index=d.index, finish_reason=reason,
                # content stays a str (MLC-LLM's examples concatenate every delta's content)
                delta=P.Delta(role="assistant" if first else None,
                              content=None if tool_calls else text, tool_calls=tool_calls),
                logprobs=self._chat_logprobs(d)))
        chunks = []
        if choices:
            chunks.append(P.ChatCompletionChunk(id=rid, created=created,
                                                model=self.model_name, choices=choices))
        if out.final and req.stream_options and req.stream_options.include_usage:
            chunks.append(P.ChatCompletionChunk(id=rid, created=created, model=self.model_name,
                                                choices=[], usage=self._usage(out)))
        return chunks

    def _chat_response(self, req, outs: list[RequestOutput], rid: str, created: int,
                       use_tools: bool) -> P.ChatCompletion:
        text = {i: "" for i in range(req.n)}
        reasons, logprobs = {}, {i: [] for i in range(req.n)}
        for out in outs:
            for d in out.deltas:
                text[d.index] += d.text
                if d.finish_reason:
                    reasons[d.index] = d.finish_reason
                if d.logprobs is not None:
                    logprobs[d.index].extend(self._chat_logprobs(d).content)
        choices = []
        for i in range(req.n):
            content, tool_calls, reason = text[i], None, reasons.get(i, "stop")
            if use_tools:
                calls = parse_tool_calls(content, req.tools)
                if calls:
                    tool_calls = [P.ChatCompletionMessageToolCall(
                        id=c["id"], function=P.Function(**c["function"])) for c in calls]
                    content, reason = None, "tool_calls"
            choices.append(P.Choice(
                index=i, finish_reason=reason,
                message=P.ChatCompletionMessage(content=content, tool_calls=tool_calls),
                logprobs=P.ChoiceLogprobs(content=logprobs[i]) if req.logprobs else None))
        return P.ChatCompletion(id=rid, created=created, model=self.model_name, choices=choices,
                                usage=self._usage(outs[-1]))

    def _completion_chunks(self, req, out: RequestOutput, rid: str, created: int,
                           state: dict) -> list[P.Completion]:
        choices = []
        for d in out.deltas:
            text = d.text
            if req.echo and d.index not in state["started"]:
                text = state["prompt"] + text
            state["started"].add(d.index)
            offset = state["offsets"].get(d.index, 0)
            state["offsets"][d.index] = offset + len(text)
            if text or d.finish_reason or d.logprobs:
                choices.append(P.CompletionChoice(
                    index=d.index, text=text, finish_reason=d.finish_reason,
                    logprobs=self._completion_logprobs(d, offset)))
        chunks = []
        if choices:
            chunks.append(P.Completion(id=rid, created=created, model=self.model_name,
                                       choices=choices))
        if out.final and req.stream_options and req.stream_options.include_usage:
            chunks.append(P.Completion(id=rid, created=created, model=self.model_name,
                                       choices=[], usage=self._usage(out)))
        return chunks

    def _completion_response(self, req, outs, rid, created, prompt_text) -> P.Completion:
        parts: dict[int, list] = {i: [] for i in range(req.n)}
        state = {"started": set(), "offsets": {}, "prompt": prompt_text}
        for out in outs:
            for chunk in self._completion_chunks(req, out, rid, created, state):
                for c in chunk.choices:
                    parts[c.index].append(c)
        choices = []
        for i in range(req.n):
            cs = parts[i]
            lp = None
            if req.logprobs is not None:
                lp = P.CompletionLogprobs(tokens=[], token_logprobs=[], text_offset=[],
                                          top_logprobs=[])
                for c in cs:
                    if c.logprobs:
                        lp.tokens += c.logprobs.tokens
                        lp.token_logprobs += c.logprobs.token_logprobs
                        lp.text_offset += c.logprobs.text_offset
                        lp.top_logprobs += c.logprobs.top_logprobs
            reason = next((c.finish_reason for c in cs if c.finish_reason), "stop")
            choices.append(P.CompletionChoice(index=i, text="".join(c.text for c in cs),
                                              finish_reason=reason, logprobs=lp))
        return P.Completion(id=rid, created=created, model=self.model_name, choices=choices,
                            usage=self._usage(outs[-1]))

    def _prompt_text(self, req) -> str:
        return req.prompt if isinstance(req.prompt, str) else self.tokenizer.decode(req.prompt)


def _load_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no tokenizer.json; re-run `mlc convert`.")
    return Tokenizer.from_file(str(path))


def _raise_if_error(out: RequestOutput) -> RequestOutput:
    if out.error is not None:
        raise out.error
    return out


@dataclass
class _Pending:
    """A submitted request and how its outputs become OpenAI objects."""

    request_id: str
    stream: Any                                          # _SyncStream or _AsyncStream
    streaming: bool
    chunks: Callable[[RequestOutput], list]              # one engine output -> stream chunks
    response: Callable[[list[RequestOutput]], Any]       # all outputs -> the response


class _Namespace:
    def __init__(self, **items):
        self.__dict__.update(items)


# ---------------------------------------------------------------------------------------------
# The synchronous engine
# ---------------------------------------------------------------------------------------------
class _SyncStream:
    """Receives a request's outputs from the loop thread."""

    def __init__(self):
        self.queue: queue.Queue[RequestOutput] = queue.Queue()

    def __call__(self, out: RequestOutput) -> None:
        self.queue.put(out)

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            out = _raise_if_error(self.queue.get())
            yield out
            if out.final:
                return


class _SyncCreate:
    """`create(**openai_kwargs)` of `chat.completions` or `completions` (sync)."""

    def __init__(self, engine: _EngineBase, start: Callable[[dict], _Pending]):
        self._engine, self._start = engine, start

    def create(self, **kwargs: Any):
        """OpenAI's `create`: the response object, or with stream=True an iterator of chunks."""
        pending = self._start(kwargs)
        if pending.streaming:
            return self._iterate(pending)
        return pending.response(list(pending.stream))

    def _iterate(self, pending: _Pending):
        try:
            for out in pending.stream:
                yield from pending.chunks(out)
        finally:
            self._engine.abort(pending.request_id)  # a consumer that stops early frees KV pages


class MLCEngine(_EngineBase):
    """The synchronous engine: `engine.chat.completions.create(...)` as in OpenAI's client.

    Parameters follow MLC-LLM: `model` (MLC dir, path to mlc-chat-config.json, `HF://` link
    or "SmolLM2-135M-Instruct"), `device` ("auto", "cpu", "cuda", "cuda:N"), `model_lib`
    (compiled on demand and cached when None), `mode` ("local", "interactive", "server"), and
    the engine limits (`max_batch_size`, `max_total_sequence_length`, `prefill_chunk_size`,
    `gpu_memory_utilization`, ...), directly or through `engine_config`.
    """

    _stream_class = _SyncStream

    def __init__(self, model: str, device: str = "auto", **kwargs: Any):
        super().__init__(model, device, **kwargs)
        self.chat = _Namespace(completions=_SyncCreate(self, self._start_chat))
        self.completions = _SyncCreate(self, self._start_completion)


# ---------------------------------------------------------------------------------------------
# The asynchronous engine
# ---------------------------------------------------------------------------------------------
class _AsyncStream:
    """Receives a request's outputs from the loop thread into an asyncio queue."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

    def __call__(self, out: RequestOutput) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            out = _raise_if_error(await self.queue.get())
            yield out
            if out.final:
                return


class _AsyncCreate:
    """`await create(**openai_kwargs)` of `chat.completions` or `completions` (asyncio)."""

    def __init__(self, engine: _EngineBase, start: Callable[[dict], _Pending]):
        self._engine, self._start = engine, start

    async def create(self, **kwargs: Any):
        """OpenAI's `create`: the response object, or with stream=True an async iterator."""
        pending = self._start(kwargs)
        if pending.streaming:
            return self._iterate(pending)
        try:
            outs = [out async for out in pending.stream]
        except asyncio.CancelledError:
            self._engine.abort(pending.request_id)
            raise
        return pending.response(outs)

    async def _iterate(self, pending: _Pending):
        try:
            async for out in pending.stream:
                for chunk in pending.chunks(out):
                    yield chunk
        finally:
            self._engine.abort(pending.request_id)


class AsyncMLCEngine(_EngineBase):
    """The asyncio engine: `await engine.chat.completions.create(...)`; concurrent requests
    are batched into the same decode steps."""

    _stream_class = _AsyncStream

    def __init__(self, model: str, device: str = "auto", **kwargs: Any):
        super().__init__(model, device, **kwargs)
        self.chat = _Namespace(completions=_AsyncCreate(self, self._start_chat))
        self.completions = _AsyncCreate(self, self._start_completion)


__all__ = ["MLCEngine", "AsyncMLCEngine", "EngineConfig"]
