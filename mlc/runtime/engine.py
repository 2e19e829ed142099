"""`MLCEngine` and `AsyncMLCEngine`: MLC-LLM's API, OpenAI's request and response shapes.

Both wrap one `EngineCore` (the loop thread). Everything about a request except how its
outputs are waited for lives in `_EngineBase`: the prompt, the model-bound checks, the
response objects. A request is validated once, by its protocol type
(`mlc.runtime.protocol`), and converted once (`to_generation_config`). The sync engine waits
on a `queue.Queue`, the async one on an asyncio queue fed thread-safely.

The public interface (used by the server, `mlc chat`, the tests and deployments): `create`
under `chat.completions` / `completions` / `embeddings` (`mlc.runtime.embeddings`),
`generate` (the engine's own per-step outputs),
`abort`, `terminate`, `stats()`, `metrics()`, `is_alive()`, `event_trace()`, `model_id`,
`encode()` / `decode()` / `encode_chat()`,
`serves_model()`, `limits`, `memory_plan`, and on the async engine `serve_request` (the HTTP
server's entry: stream chunks come as JSON text, without building response objects per
token).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from mlc.errors import (
    BadRequestError,
    ContextWindowExceededError,
    EngineTerminatedError,
    ModelLoadError,
)
from mlc.runtime import embeddings as E
from mlc.runtime import protocol as P
from mlc.runtime.chat_template import render_chat
from mlc.runtime.device import parse_runtime_device
from mlc.runtime.device_sampler import DeviceSampler
from mlc.runtime.engine_core import EngineCore
from mlc.runtime.generation_config import GenerationConfig
from mlc.runtime.grammar import (
    CompiledGrammar,
    grammar_compiler,
    grammar_from_response_format,
)
from mlc.runtime.memory_plan import DraftNeeds, plan_memory
from mlc.runtime.metrics import EngineStats, MetricsSnapshot
from mlc.runtime.model import SAMPLING_FUNCTIONS, KVCacheConfig, LoadedModel
from mlc.runtime.model_source import EMBEDDED_NAME, resolve_model
from mlc.runtime.penalties import builtin_processor_factories
from mlc.runtime.request import EngineLimits, Request, RequestOutput
from mlc.runtime.sampler import HostSampler
from mlc.runtime.tool_calls import (
    ToolCallStreamParser,
    compile_tool_choice,
    parse_tool_calls,
)
from mlc.runtime.tracing import Tracer
from mlc.support.memory import release_free_memory
from mlc.support.tensor_cache import numpy_dtype

logger = logging.getLogger(__name__)
SPECULATIVE_MODES = ("disable", "ngram", "small_draft", "eagle")
DEFAULT_SPEC_DRAFT_LENGTH = 4
PREFIX_CACHE_MODES = ("radix", "disable")


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
    prefix_cache_mode: str = "radix"
    verbose: bool = False


def _param_bytes(model: LoadedModel) -> int:
    """Bytes of a loaded model's weights on its device."""
    return sum(p.numel() * numpy_dtype(str(p.dtype)).itemsize for p in model.params)


def _check_is_head(head_dir: Path, name: str) -> None:
    """Refuse a model dir that is not an EAGLE head (before compiling or loading it)."""
    chat = LoadedModel.peek_chat_config(head_dir)
    if chat.model_type != "eagle":
        raise ModelLoadError(
            f"speculative_mode='eagle' needs an EAGLE head in additional_models, and {name} "
            f"is a {chat.model_type} model. Convert a published head (e.g. "
            "yuhuili/EAGLE-LLaMA3-Instruct-8B) with `mlc convert HEAD_DIR -o OUT`, or use "
            "speculative_mode='small_draft' for a draft model.", param="additional_models")


def _load_head(head_dir: Path, lib, device: str, target: LoadedModel, name: str):
    """An EAGLE head for `target`: refused, naming the mismatch, unless its hidden size and
    dtype are the target's."""
    from mlc.runtime.model import LoadedHead

    head = LoadedHead(head_dir, lib, device)
    t, h = target.metadata, head.metadata
    for key in ("hidden_size", "model_dtype"):
        if t[key] != h[key]:
            raise ModelLoadError(
                f"The EAGLE head {name} has {key}={h[key]} and the target {t[key]}: a head "
                "drafts from the target's hidden states, so it must be made for this target "
                "(and converted with the target's quantization dtype).",
                param="additional_models")
    return head


def _check_draft_bounds(draft: LoadedModel, plan) -> None:
    """A draft library compiled for a smaller batch than the engine's is refused."""
    bound = draft.metadata["max_batch_size"]
    if plan.max_batch_size > bound:
        raise ModelLoadError(
            f"The draft library was compiled for max_batch_size={bound}, below the engine's "
            f"{plan.max_batch_size}: lower max_batch_size or recompile the draft with "
            f"--overrides max_batch_size={plan.max_batch_size}.", param="additional_models")


class _EngineBase:
    """Loading, request preparation and response building shared by both engines."""

    def __init__(self, model: str, device: str = "auto", *, model_lib: str | None = None,
                 mode: str = "local", engine_config: EngineConfig | None = None,
                 additional_models: list | None = None, max_batch_size: int | None = None,
                 max_total_sequence_length: int | None = None,
                 prefill_chunk_size: int | None = None, max_history_size: int | None = None,
                 gpu_memory_utilization: float | None = None,
                 speculative_mode: str = "disable", spec_draft_length: int | None = None,
                 prefix_cache_mode: str | None = None, enable_tracing: bool = False, verbose: bool = False,
                 served_model_name: str | None = None, sampling: str = "auto",
                 embedding_pooling: str = E.DEFAULT_POOLING):
        cfg = engine_config or EngineConfig()
        self.embedding_pooling = E.check_pooling(embedding_pooling)
        pick = lambda given, from_cfg: given if given is not None else from_cfg
        self.model_arg = str(model)
        self.mode = cfg.mode or mode
        speculative_mode = cfg.speculative_mode if engine_config else speculative_mode
        if speculative_mode not in SPECULATIVE_MODES:
            raise ModelLoadError(f"speculative_mode must be one of {SPECULATIVE_MODES}, got "
                                 f"{speculative_mode!r}.", param="speculative_mode")
        self.speculative_mode = speculative_mode
        prefix_cache_mode = pick(prefix_cache_mode, cfg.prefix_cache_mode)
        if prefix_cache_mode not in PREFIX_CACHE_MODES:
            raise ModelLoadError(f"prefix_cache_mode must be one of {PREFIX_CACHE_MODES}, got "
                                 f"{prefix_cache_mode!r}.", param="prefix_cache_mode")
        self.prefix_cache_mode = prefix_cache_mode
        if sampling not in SAMPLING_PATHS:
            raise ModelLoadError(f"sampling must be one of {SAMPLING_PATHS}, got {sampling!r}.",
                                 param="sampling")
        self.additional_models = additional_models or cfg.additional_models
        self.max_history_size = pick(max_history_size, cfg.max_history_size)
        self.spec_draft_length = pick(spec_draft_length, cfg.spec_draft_length) \
            or DEFAULT_SPEC_DRAFT_LENGTH
        if self.spec_draft_length < 0:
            raise ModelLoadError(f"spec_draft_length must be positive, got "
                                 f"{self.spec_draft_length}.", param="spec_draft_length")
        self.verbose = verbose or cfg.verbose
        self.device_arg = device
        kind, _ = parse_runtime_device(device)
        self.model_dir = resolve_model(model, quiet=not self.verbose, device_kind=kind)
        self.model_id = served_model_name or _model_id(self.model_arg, self.model_dir)
        t0 = time.perf_counter()
        self.model = self._load_runner(pick(model_lib, cfg.model_lib), device)
        self.chat_config = self.model.chat_config
        if speculative_mode == "eagle":        # (before loading the head: fail fast)
            self.model.enable_hidden_states()
        # the draft (small_draft) or EAGLE head is loaded first: the plan budgets for it
        self.draft_model = self._load_draft_model() \
            if speculative_mode in ("small_draft", "eagle") else None
        draft = self.draft_model
        self.memory_plan = plan_memory(
            self.model.metadata, _param_bytes(self.model), self.model.device, self.mode,
            pick(max_batch_size, cfg.max_batch_size),
            pick(max_total_sequence_length, cfg.max_total_sequence_length),
            pick(prefill_chunk_size, cfg.prefill_chunk_size),
            pick(gpu_memory_utilization, cfg.gpu_memory_utilization),
            DraftNeeds.of(draft.metadata, _param_bytes(draft)) if draft else None)
        plan = self.memory_plan
        self.limits = EngineLimits(plan.max_batch_size, plan.max_total_sequence_length,
                                   plan.prefill_chunk_size, plan.context_window_size)
        kv_config = KVCacheConfig(plan.max_batch_size, plan.max_total_sequence_length,
                                  plan.prefill_chunk_size)
        self.model.create_kv_cache(kv_config)
        if draft is not None:
            _check_draft_bounds(draft, plan)
            draft.create_kv_cache(kv_config)
        self.sampling_path = _sampling_path(sampling, self.model)
        if self.verbose:
            logger.warning("loaded %s (%s) on %s in %.1fs, sampling on the %s\n%s",
                           self.model_dir, self.model.lib_path, self.model.device_kind,
                           time.perf_counter() - t0, self.sampling_path, plan.describe())
        self.tokenizer = _load_tokenizer(self.model_dir)
        release_free_memory()       # what loading freed (tokenizer JSON, weight reads)
        self.tracer = Tracer(enabled=enable_tracing)
        sampler = DeviceSampler(self.model) if self.sampling_path == "device" else HostSampler()
        self._core = EngineCore(self.model, self.limits, sampler, self.tracer, self.model_id,
                                prefix_cache=prefix_cache_mode == "radix",
                                speculation=self._speculation())
        self._terminated = False
        self._grammar_compiler = None      # built on the first constrained request

    def _load_runner(self, model_lib: str | None, device: str) -> LoadedModel:
        """The engine's `ModelRunner`: the model dir's weights with `model_lib` (compiled on
        demand and cached when None). The one seam for another runner: the fake model of the
        host-path benchmarks and tests (`mlc.runtime.fake_runner`) overrides it."""
        if model_lib is None:
            from mlc.runtime.jit import find_or_build_library

            kind, dev = parse_runtime_device(device)
            model_lib = find_or_build_library(self.model_dir, kind, dev,
                                              quiet=not self.verbose)
        return LoadedModel(self.model_dir, model_lib, device)

    @property
    def grammar_compiler(self):
        """The engine's `grammar.GrammarCompiler` (one per engine, built on first use: ~0.2 s
        for the llguidance tokenizer; requests without a grammar never build it)."""
        if self._grammar_compiler is None:
            self._grammar_compiler = grammar_compiler(
                self.tokenizer, self.model.vocab_size, self.chat_config.eos_token_id or [])
        return self._grammar_compiler

    def _speculation(self):
        """(drafter, draft length) of the speculative mode, or None."""
        from mlc.runtime.speculation import EagleDrafter, ModelDrafter, NgramDrafter

        if self.speculative_mode == "ngram":
            return NgramDrafter(), self.spec_draft_length
        chunk = min(self.limits.prefill_chunk_size,
                    self.draft_model.metadata["prefill_chunk_size"]) if self.draft_model else 0
        if self.speculative_mode == "small_draft":
            return ModelDrafter(self.draft_model, chunk), self.spec_draft_length
        if self.speculative_mode == "eagle":
            return EagleDrafter(self.draft_model, self.model, chunk), self.spec_draft_length
        return None

    def _load_draft_model(self) -> LoadedModel:
        """The draft model of small_draft (or the head of eagle): additional_models[0],
        "model_path" or "model_path:model_lib" (or a (path, lib) pair), its library compiled
        on demand when absent; same vocabulary as the target, same device. Its KV cache is
        created after the memory plan."""
        mode = self.speculative_mode
        what = "an EAGLE head" if mode == "eagle" else "a draft model"
        if not self.additional_models:
            raise ModelLoadError(
                f"speculative_mode={mode!r} needs {what}: pass "
                "additional_models=['DRAFT_MODEL'] (or 'DRAFT_MODEL:DRAFT_LIB').",
                param="additional_models")
        spec = self.additional_models[0]
        if isinstance(spec, (tuple, list)):
            path, lib = spec
        else:
            path, lib = str(spec), None
            if ":" in path and not path.startswith("HF://"):
                path, lib = path.split(":", 1)
        kind, dev = parse_runtime_device(self.device_arg)
        draft_dir = resolve_model(path, quiet=not self.verbose, device_kind=kind)
        if mode == "eagle":
            _check_is_head(draft_dir, path)
        if lib is None:
            from mlc.runtime.jit import find_or_build_library

            lib = find_or_build_library(draft_dir, kind, dev, quiet=not self.verbose)
        if mode == "eagle":
            draft = _load_head(draft_dir, lib, self.device_arg, self.model, path)
        else:
            draft = LoadedModel(draft_dir, lib, self.device_arg)
        if draft.vocab_size != self.model.vocab_size:
            raise ModelLoadError(
                f"The draft model {path} has a vocabulary of {draft.vocab_size} tokens and the "
                f"target {self.model.vocab_size}: a draft must share the target's tokenizer.",
                param="additional_models")
        return draft

    # -- the public interface beyond create --------------------------------------------
    def is_alive(self) -> bool:
        """True until `terminate()` (or until the loop thread died)."""
        return not self._terminated and self._core.is_alive()

    def stats(self) -> EngineStats:
        """Queues, KV-cache pages and cumulative prefill/decode work, right now."""
        return self._core.stats()

    def metrics(self) -> MetricsSnapshot:
        """Request counters, token counters, latency histograms and gauges (`/metrics`)."""
        return self._core.metrics()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of `text` as a completion prompt is tokenized (with the model's BOS
        when it adds one and `add_special_tokens`)."""
        if add_special_tokens:
            return self._encode(text)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids` (special tokens included)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt token ids of chat `messages` (the model's template, then its tokenizer)."""
        req = P.parse_chat_request(messages=messages)
        return self._encode(render_chat(self.chat_config, req.messages))

    def serves_model(self, name: str | None) -> bool:
        """Whether a request's `model` field names this engine's model (None: any)."""
        return name in (None, "", self.model_id, self.model_arg, str(self.model_dir),
                        self.model_dir.name)

    # -- lifecycle -------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if not self.is_alive():
            raise EngineTerminatedError(
                "This engine has been terminated; create a new MLCEngine to run requests.")

    def terminate(self) -> None:
        """Stop the engine loop and free the model and its KV cache."""
        if not self._terminated:
            self._terminated = True
            self._core.shutdown()
            for model in (self.model, self.draft_model):
                if model is not None:
                    model.kv_cache = None
                    model.params = []

    def abort(self, request_id: str) -> None:
        """End a request early; its streams finish with finish_reason "abort"."""
        self._core.abort(request_id)

    def event_trace(self) -> dict[str, Any] | None:
        """The Chrome trace (a JSON object) of the requests so far; None unless the engine
        was created with enable_tracing=True."""
        return self.tracer.to_chrome_trace() if self.tracer.enabled else None

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
        if not self.serves_model(name):
            raise BadRequestError(f"The model {name!r} does not exist: this engine serves "
                                  f"{self.model_id!r}.", param="model", code="model_not_found")

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.chat_config.bos_token_id
        if self.chat_config.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def _finish_config(self, gen: GenerationConfig, prompt_len: int,
                       prompt_param: str) -> GenerationConfig:
        """The model's defaults and the checks only the model can make (vocabulary, context
        window, batch size); the request's own fields were validated by the protocol."""
        gen = gen.with_defaults(self.chat_config).check_for_model(self.model.vocab_size)
        if gen.n > self.limits.max_batch_size:   # would never be admitted
            raise BadRequestError(
                f"Invalid 'n': {gen.n} choices exceed this engine's max_batch_size "
                f"{self.limits.max_batch_size}; lower n or raise max_batch_size.", param="n")
        ctx = self.limits.context_window_size
        completion = gen.max_tokens or 1
        if prompt_len + completion > ctx:
            where = "messages" if prompt_param == "messages" else "prompt"
            raise ContextWindowExceededError(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_len + completion} tokens ({prompt_len} in the {where}, {completion} "
                f"in the completion). Please reduce the length of the {where} or completion.",
                param="max_tokens" if prompt_len < ctx and gen.max_tokens else prompt_param)
        return gen

    def _with_grammar(self, gen: GenerationConfig,
                      compiled: CompiledGrammar | None = None) -> GenerationConfig:
        """Compile the request's grammar (a forced tool_choice's, given as `compiled`, else
        its `response_format`'s) and attach one `GrammarProcessor` per sequence. A grammar
        that does not compile is a `BadRequestError` naming its field, before any work."""
        if compiled is None:
            spec = grammar_from_response_format(gen.response_format)
            if spec is None:
                return gen
            compiled = self.grammar_compiler.compile(spec)
        factory = lambda prompt_ids: compiled.processor()
        return dataclasses.replace(gen, logit_processors=[*gen.logit_processors, factory])

    def _prepare_chat(self, request) -> tuple[P.ChatCompletionRequest, list[int],
                                              GenerationConfig, bool]:
        req = P.parse_chat_request(request)
        self._check_model_field(req.model)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        ids = self._encode(render_chat(self.chat_config, req.messages,
                                       tools=req.tools if use_tools else None))
        gen = self._finish_config(req.to_generation_config(), len(ids), "messages")
        forced = None
        if use_tools and req.tool_choice not in (None, "auto"):     # "required" or named
            forced = compile_tool_choice(self.grammar_compiler, req.tools, req.tool_choice,
                                         req.parallel_tool_calls)
        return req, ids, self._with_grammar(gen, forced), use_tools

    def _prepare_completion(self, request) -> tuple[P.CompletionRequest, list[int],
                                                    GenerationConfig]:
        req = P.parse_completion_request(request)
        self._check_model_field(req.model)
        prompt = req.prompt
        ids = list(prompt) if isinstance(prompt, list) else self._encode(prompt)
        if any(t >= self.model.vocab_size for t in ids):
            raise BadRequestError("prompt token ids must be < the vocabulary size "
                                  f"{self.model.vocab_size}.", param="prompt")
        gen = self._finish_config(req.to_generation_config(), len(ids), "prompt")
        if gen.max_tokens == 0:     # score the prompt only: the one token sampled is dropped
            gen = dataclasses.replace(gen, max_tokens=1)
        return req, ids, self._with_grammar(gen)

    def _submit(self, request_id: str, ids: list[int], gen: GenerationConfig):
        """Hand a request to the loop; its outputs arrive on the returned stream."""
        stream = self._stream_class()
        factories = builtin_processor_factories(gen) + list(gen.logit_processors)
        stop_ids = set(gen.stop_token_ids) | (set() if gen.ignore_eos
                                              else set(self.chat_config.eos_token_id or []))
        self._core.submit(Request(request_id, ids, gen, self.tokenizer, stop_ids, stream,
                                  factories))
        return stream

    def _start_chat(self, request) -> _Pending:
        self._check_alive()
        req, ids, gen, use_tools = self._prepare_chat(request)
        rid, created = req.request_id, int(time.time())
        state = _StreamState()
        render = _ChunkJSON(rid, created, self.model_id, "chat.completion.chunk")
        return _Pending(rid, self._submit(rid, ids, gen), req.stream,
                        lambda out: self._chat_chunks(req, out, rid, created, state, use_tools),
                        lambda outs: self._chat_response(req, outs, rid, created, use_tools),
                        lambda out: self._chat_chunks_json(req, out, state, use_tools, render))

    def _start_completion(self, request) -> _Pending:
        self._check_alive()
        req, ids, gen = self._prepare_completion(request)
        rid, created = req.request_id, int(time.time())
        prompt_text = self._prompt_text(req) if req.echo else ""
        state = _StreamState(prompt=prompt_text, prompt_ids=ids)
        render = _ChunkJSON(rid, created, self.model_id, "text_completion")
        return _Pending(rid, self._submit(rid, ids, gen), req.stream,
                        lambda out: self._completion_chunks(req, out, rid, created, state),
                        lambda outs: self._completion_response(req, outs, rid, created,
                                                               prompt_text, ids),
                        lambda out: self._completion_chunks_json(req, out, state, render))

    def _start_embeddings(self, request) -> tuple[E.EmbeddingRequest, E.EmbeddingJob]:
        """Validate an embeddings request and queue its inputs on the engine loop."""
        self._check_alive()
        req = E.parse_embedding_request(request)
        self._check_model_field(req.model)
        self.model.check_hidden_states()
        job = E.prepare_job(req, self._encode, self.model.vocab_size,
                            self.limits.context_window_size, self.embedding_pooling)
        self._core.submit_embedding(job)
        return req, job

    def _embeddings_response(self, req, job, vectors) -> E.CreateEmbeddingResponse:
        return E.build_response(req, job, vectors, self.model_id)

    def _start_generate(self, request) -> _Pending:
        self._check_alive()
        req, ids, gen = self._prepare_completion(request)
        if req.max_tokens == 0:
            raise BadRequestError("generate() needs max_tokens >= 1 (max_tokens=0 scores a "
                                  "prompt: use completions.create with echo and logprobs).",
                                  param="max_tokens")
        return _Pending(req.request_id, self._submit(req.request_id, ids, gen), True,
                        lambda out: [out], lambda outs: outs, lambda out: [])

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
            top_logprobs=[self._top_dict(lp.top) for lp in delta.logprobs])

    def _top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """Legacy top_logprobs: token text -> logprob, most likely first (tokens whose text
        is the same keep the likelier one)."""
        out: dict[str, float] = {}
        for token_id, logprob in top:
            out.setdefault(self._token_str(token_id), logprob)
        return out

    @staticmethod
    def _usage(out: RequestOutput) -> P.CompletionUsage:
        return P.CompletionUsage(
            prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
            total_tokens=out.prompt_tokens + out.completion_tokens,
            prompt_tokens_details=P.PromptTokensDetails(cached_tokens=out.cached_tokens))

    def _chat_chunks(self, req, out: RequestOutput, rid: str, created: int,
                     state: _StreamState, use_tools: bool) -> list[P.ChatCompletionChunk]:
        """The stream chunks for one engine output (tool-call choices are held to the end)."""
        choices = []
        for d in out.deltas:
            first = d.index not in state.started
            state.started.add(d.index)
            text = d.text
            tool_calls = None
            reason = d.finish_reason
            if use_tools:     # content and OpenAI's tool-call deltas, as the text arrives
                parser = state.parsers.get(d.index)
                if parser is None:
                    parser = state.parsers[d.index] = ToolCallStreamParser(req.tools)
                parsed = parser.feed(text)
                if reason:
                    tail = parser.finish()
                    parsed.content += tail.content
                    parsed.tool_calls += tail.tool_calls
                    if reason == "stop" and parser.tool_calls:
                        reason = "tool_calls"
                text = parsed.content
                tool_calls = [P.ChoiceDeltaToolCall(**c.to_openai()) for c in parsed.tool_calls
                              if c.index == 0 or req.parallel_tool_calls is not False] or None
            if not (text or first or reason or tool_calls or d.logprobs):
                continue
            choices.append(P.ChunkChoice(
                index=d.index, finish_reason=reason,
                # content stays a str (MLC-LLM's examples concatenate every delta's content);
                # the role is in every chunk, as MLC-LLM sends it (OpenAI: the first only)
                delta=P.Delta(role="assistant",
                              content=None if tool_calls and not text else text,
                              tool_calls=tool_calls),
                logprobs=self._chat_logprobs(d)))
        chunks = []
        if choices:
            chunks.append(P.ChatCompletionChunk(id=rid, created=created,
                                                model=self.model_id, choices=choices))
        if out.final and req.stream_options and req.stream_options.include_usage:
            chunks.append(P.ChatCompletionChunk(id=rid, created=created, model=self.model_id,
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
            parsed = parse_tool_calls(content, req.tools) if use_tools else None
            if parsed is not None and parsed.tool_calls:
                calls = parsed.tool_calls
                if req.parallel_tool_calls is False:
                    calls = calls[:1]
                tool_calls = [P.ChatCompletionMessageToolCall(
                    id=c["id"], function=P.Function(**c["function"])) for c in calls]
                content = parsed.content
                if reason == "stop":
                    reason = "tool_calls"
            choices.append(P.Choice(
                index=i, finish_reason=reason,
                message=P.ChatCompletionMessage(content=content, tool_calls=tool_calls),
                logprobs=P.ChoiceLogprobs(content=logprobs[i]) if req.logprobs else None))
        return P.ChatCompletion(id=rid, created=created, model=self.model_id, choices=choices,
                                usage=self._usage(outs[-1]))

    def _completion_chunks(self, req, out: RequestOutput, rid: str, created: int,
                           state: _StreamState) -> list[P.Completion]:
        choices = []
        if out.prompt_logprobs is not None:
            state.prompt_logprobs = out.prompt_logprobs
        for d in out.deltas:
            if req.max_tokens == 0:     # prompt scoring: the token sampled is not returned
                d = dataclasses.replace(d, text="", token_ids=[],
                                        logprobs=None if d.logprobs is None else [],
                                        finish_reason=d.finish_reason and "length")
            text, first = d.text, d.index not in state.started
            state.started.add(d.index)
            offset = state.offsets.get(d.index, 0)
            prompt_lp = None
            if req.echo and first:
                text = state.prompt + text
                if req.logprobs is not None and state.prompt_logprobs is not None:
                    prompt_lp = self._prompt_logprobs(state)
            state.offsets[d.index] = offset + len(text)
            lp = self._completion_logprobs(d, offset + len(text) - len(d.text))
            if prompt_lp is not None:
                lp = _join_logprobs(prompt_lp, lp)
            if text or d.finish_reason or d.logprobs or prompt_lp is not None:
                choices.append(P.CompletionChoice(index=d.index, text=text,
                                                  finish_reason=d.finish_reason, logprobs=lp))
        chunks = []
        if choices:
            chunks.append(P.Completion(id=rid, created=created, model=self.model_id,
                                       choices=choices))
        if out.final and req.stream_options and req.stream_options.include_usage:
            chunks.append(P.Completion(id=rid, created=created, model=self.model_id,
                                       choices=[], usage=self._completion_usage(req, out)))
        return chunks

    def _completion_usage(self, req, out: RequestOutput) -> P.CompletionUsage:
        usage = self._usage(out)
        if req.max_tokens == 0:
            usage.completion_tokens, usage.total_tokens = 0, usage.prompt_tokens
        return usage

    def _prompt_logprobs(self, state: _StreamState) -> P.CompletionLogprobs:
        """The echoed prompt's logprobs: one entry per prompt token, null for the first,
        text_offset into the echoed prompt text."""
        ids = state.prompt_ids
        entries = state.prompt_logprobs
        return P.CompletionLogprobs(
            tokens=[self._token_str(t) for t in ids],
            token_logprobs=[None if e is None else e.logprob for e in entries],
            text_offset=self._prompt_offsets(state.prompt, ids),
            top_logprobs=[None if e is None else self._top_dict(e.top) for e in entries])

    def _prompt_offsets(self, prompt: str, ids: list[int]) -> list[int]:
        """Where each prompt token starts in the prompt text (the tokenizer's offsets for a
        text prompt; for token ids, the length of the text of the tokens before it)."""
        enc = self.tokenizer.encode(prompt, add_special_tokens=False)
        if list(enc.ids) == ids[len(ids) - len(enc.ids):]:
            starts = [start for start, _ in enc.offsets]
            return [0] * (len(ids) - len(starts)) + starts      # a BOS added: offset 0
        return [len(self.tokenizer.decode(ids[:i])) for i in range(len(ids))]

    def _completion_response(self, req, outs, rid, created, prompt_text,
                             prompt_ids=()) -> P.Completion:
        parts: dict[int, list] = {i: [] for i in range(req.n)}
        state = _StreamState(prompt=prompt_text, prompt_ids=list(prompt_ids))
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
        return P.Completion(id=rid, created=created, model=self.model_id, choices=choices,
                            usage=self._completion_usage(req, outs[-1]))

    # -- stream chunks as JSON text (the server's hot path) ------------------------------
    def _chat_chunks_json(self, req, out: RequestOutput, state: _StreamState,
                          use_tools: bool, render: _ChunkJSON) -> list[str]:
        """`_chat_chunks` as JSON text: plain text deltas are written directly, anything
        richer (logprobs, tool calls, usage) goes through the response objects."""
        if use_tools or any(d.logprobs for d in out.deltas):
            return [_chat_chunk_json(c) for c in self._chat_chunks(
                req, out, render.rid, render.created, state, use_tools)]
        choices = []
        for d in out.deltas:
            first = d.index not in state.started
            if first:
                state.started.add(d.index)
            if d.text or first or d.finish_reason:
                choices.append(render.chat_text_choice(d.index, d.text, d.finish_reason))
        chunks = [render.raw(",".join(choices))] if choices else []
        if out.final and req.stream_options and req.stream_options.include_usage:
            chunks.append(render([], self._usage(out).model_dump()))
        return chunks

    def _completion_chunks_json(self, req, out: RequestOutput, state: _StreamState,
                                render: _ChunkJSON) -> list[str]:
        """`_completion_chunks` as JSON text (richer deltas go through the objects)."""
        if req.echo or req.max_tokens == 0 or any(d.logprobs for d in out.deltas):
            return [c.model_dump_json() for c in self._completion_chunks(
                req, out, render.rid, render.created, state)]
        choices = [render.completion_text_choice(d.index, d.text, d.finish_reason)
                   for d in out.deltas if d.text or d.finish_reason]
        chunks = [render.raw(",".join(choices))] if choices else []
        if out.final and req.stream_options and req.stream_options.include_usage:
            chunks.append(render([], self._usage(out).model_dump()))
        return chunks

    def _prompt_text(self, req) -> str:
        return req.prompt if isinstance(req.prompt, str) else self.tokenizer.decode(req.prompt)


def _chat_chunk_json(chunk: P.ChatCompletionChunk) -> str:
    """A chunk as JSON; tool-call deltas leave out their unset keys, as OpenAI's do (a
    continuation `{"index", "function": {"arguments"}}` with `"type": null` would overwrite
    the type that clients such as openai's stream helper accumulated)."""
    if not any(c.delta.tool_calls for c in chunk.choices):
        return chunk.model_dump_json()
    data = chunk.model_dump(mode="json")
    for choice, obj in zip(data["choices"], chunk.choices):
        if obj.delta.tool_calls:
            choice["delta"]["tool_calls"] = [t.model_dump(mode="json", exclude_none=True)
                                             for t in obj.delta.tool_calls]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _load_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no tokenizer.json; re-run `mlc convert`.")
    return Tokenizer.from_file(str(path))


def _model_id(model_arg: str, model_dir: Path) -> str:
    """The id the engine serves under: the model dir's name (never an absolute path), the
    repo of an HF:// link, or the embedded model's name."""
    if model_arg.startswith("HF://"):
        return model_arg[len("HF://"):]
    if model_arg == EMBEDDED_NAME:
        return EMBEDDED_NAME
    return model_dir.name


SAMPLING_PATHS = ("auto", "device", "host")


def _sampling_path(choice: str, model: LoadedModel) -> str:
    """Where tokens are sampled. "auto": on the device for GPU libraries (only the chosen ids
    cross to the host); on the CPU the host path, which measured faster there (numpy draws
    without sorting the vocabulary; the library's top-p/top-k kernel sorts every row: see
    bench/NOTES.md, "Sampling on the CPU")."""
    has_all = all(f in model.sampling for f in SAMPLING_FUNCTIONS)
    if choice == "device" and not has_all:
        raise ModelLoadError(f"{model.lib_path} lacks device sampling functions "
                             f"{[f for f in SAMPLING_FUNCTIONS if f not in model.sampling]}; "
                             "use sampling='host' or rebuild it with `mlc compile`.",
                             param="sampling")
    if choice == "auto":
        return "device" if has_all and model.device_kind != "cpu" else "host"
    return choice


def _request_args(request: Any, kwargs: dict[str, Any]) -> Any:
    """What `create()` was given, as one request: a parsed request as is, or the keyword
    arguments with `extra_body`'s fields merged in (the openai client sends them in the JSON
    body, over the named arguments)."""
    if request is not None:
        return request
    extra = kwargs.pop("extra_body", None)
    if extra is None:
        return kwargs
    if not isinstance(extra, dict):
        raise BadRequestError(f"extra_body must be a dict of request fields, got "
                              f"{type(extra).__name__}.", param="extra_body")
    return {**kwargs, **extra}


def _raise_if_error(out: RequestOutput) -> RequestOutput:
    if out.error is not None:
        raise out.error
    return out


@dataclass
class _StreamState:
    """Per-request state of turning outputs into stream chunks."""

    started: set[int] = field(default_factory=set)      # choices that sent a chunk
    parsers: dict[int, ToolCallStreamParser] = field(default_factory=dict)  # tool calls
    offsets: dict[int, int] = field(default_factory=dict)
    prompt: str = ""                                    # echo of completions
    prompt_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list | None = None                 # echo with logprobs


def _join_logprobs(first: P.CompletionLogprobs, then: P.CompletionLogprobs | None
                   ) -> P.CompletionLogprobs:
    if then is None:
        return first
    return P.CompletionLogprobs(tokens=first.tokens + then.tokens,
                                token_logprobs=first.token_logprobs + then.token_logprobs,
                                text_offset=first.text_offset + then.text_offset,
                                top_logprobs=first.top_logprobs + then.top_logprobs)


_json_str = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class _ChunkJSON:
    """A stream chunk as compact JSON, fields in the response type's order (what
    `model_dump_json()` of `ChatCompletionChunk` / `Completion` writes).

    A plain text delta, the stream's commonest chunk by far, is written from a template:
    everything but the text, index and finish reason is fixed per request, so it costs one
    string escape instead of a `json.dumps` of nested dicts (the tests compare both)."""

    def __init__(self, rid: str, created: int, model: str, obj: str):
        self.rid, self.created, self.model, self.obj = rid, created, model, obj
        self._head = f'{{"id":{_json_str(rid)},"choices":['
        self._tail = (f'],"created":{int(created)},"model":{_json_str(model)},'
                      f'"object":{_json_str(obj)},"system_fingerprint":null,"usage":null}}')

    def __call__(self, choices: list[dict], usage: dict | None = None) -> str:
        return json.dumps({"id": self.rid, "choices": choices, "created": self.created,
                           "model": self.model, "object": self.obj,
                           "system_fingerprint": None, "usage": usage},
                          ensure_ascii=False, separators=(",", ":"))

    def raw(self, choices_json: str) -> str:
        """The chunk around choices already written as JSON (comma-separated objects)."""
        return self._head + choices_json + self._tail

    @staticmethod
    def chat_text_choice(index: int, text: str, finish_reason: str | None) -> str:
        """A chat choice whose delta is text (the role in every chunk, as MLC-LLM sends)."""
        return (f'{{"delta":{{"content":{_json_str(text)},"refusal":null,"role":"assistant",'
                f'"tool_calls":null}},"finish_reason":{_json_str(finish_reason)},'
                f'"index":{int(index)},"logprobs":null}}')

    @staticmethod
    def completion_text_choice(index: int, text: str, finish_reason: str | None) -> str:
        """A completion choice of text without logprobs."""
        return (f'{{"finish_reason":{_json_str(finish_reason)},"index":{int(index)},'
                f'"logprobs":null,"text":{_json_str(text)}}}')


@dataclass
class _Pending:
    """A submitted request and how its outputs become OpenAI objects (or JSON text)."""

    request_id: str
    stream: Any                                          # _SyncStream or _AsyncStream
    streaming: bool
    chunks: Callable[[RequestOutput], list]              # one engine output -> stream chunks
    response: Callable[[list[RequestOutput]], Any]       # all outputs -> the response
    chunks_json: Callable[[RequestOutput], list[str]]    # stream chunks as JSON text


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

    def create(self, request: P.ChatCompletionRequest | P.CompletionRequest | None = None,
               /, **kwargs: Any):
        """OpenAI's `create(**kwargs)`: the response object, or with stream=True an iterator
        of chunks. A request already parsed by `mlc.runtime.protocol` may be passed instead.
        `extra_body={...}` adds fields as the openai client does (e.g. `debug_config`)."""
        pending = self._start(_request_args(request, kwargs))
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
        self.embeddings = E.SyncEmbeddings(self._start_embeddings, self._embeddings_response)
        self._generate = _SyncCreate(self, self._start_generate)

    def generate(self, prompt: str | list[int], **kwargs: Any) -> Iterator[RequestOutput]:
        """The engine's own outputs for a completion request (token ids and text per step,
        per choice), without OpenAI's response shapes; kwargs are `completions.create`'s."""
        return self._generate.create(prompt=prompt, **kwargs, stream=True)


# ---------------------------------------------------------------------------------------------
# The asynchronous engine
# ---------------------------------------------------------------------------------------------
class _LoopDispatch:
    """Hands outputs from the engine thread to one asyncio loop: the outputs of one step (for
    every request on that loop) arrive with one wakeup of the loop, not one per request."""

    _by_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[_AsyncStream, RequestOutput]] = []
        self.woken = False              # a drain is scheduled and has not run yet

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _LoopDispatch:
        dispatch = cls._by_loop.get(loop)
        if dispatch is None:
            dispatch = cls._by_loop[loop] = cls(loop)
        return dispatch

    def put(self, stream: _AsyncStream, out: RequestOutput) -> None:
        """(engine thread) Queue `out` for `stream`, until the next `flush`."""
        with self.lock:
            self.pending.append((stream, out))

    def flush(self) -> None:
        """(engine thread) Wake the loop once for every output queued since the last wakeup
        (the engine core calls this once per step: `EngineCore` says when)."""
        with self.lock:
            if not self.pending or self.woken:
                return
            self.woken = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:            # the loop was closed: nobody is waiting any more
            with self.lock:
                self.pending.clear()
                self.woken = False

    def _drain(self) -> None:
        with self.lock:
            items, self.pending, self.woken = self.pending, [], False
        for stream, out in items:
            stream.push(out)


class _AsyncStream:
    """Receives a request's outputs from the loop thread; the consumer takes every output
    that arrived since it last looked (`next_batch`), or one at a time (`async for`)."""

    def __init__(self):
        self.dispatch = _LoopDispatch.of(asyncio.get_running_loop())
        self.ready: deque[RequestOutput] = deque()
        self.waiter: asyncio.Future | None = None

    def __call__(self, out: RequestOutput) -> None:
        self.dispatch.put(self, out)

    @property
    def flush(self) -> Callable[[], None]:
        """The loop's wakeup, shared by every stream on it (`OutputSink.flush`)."""
        return self.dispatch.flush

    def push(self, out: RequestOutput) -> None:
        """(event loop) Add an output and wake the consumer."""
        self.ready.append(out)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next_batch(self) -> list[RequestOutput]:
        """The outputs that arrived and were not taken yet, in order (waits for one)."""
        while not self.ready:
            self.waiter = self.dispatch.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        outs = list(self.ready)
        self.ready.clear()
        return outs

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            for out in await self.next_batch():
                yield _raise_if_error(out)
                if out.final:
                    return


class ChunkStream:
    """A streamed response as JSON text chunks, for the HTTP server (`serve_request`).

    `async for chunk in stream` gives one chunk at a time. `stream.batches()` gives, at each
    wakeup, every chunk of the outputs that arrived since the last one: one step's chunk
    when the consumer keeps up, several steps' when it fell behind, so a server can write
    them with one send. An engine error raises after the chunks before it. The request is
    aborted when the stream is closed before its end (`aclose`)."""

    def __init__(self, engine: _EngineBase, pending: _Pending):
        self._engine, self._pending = engine, pending
        self._gen: Any = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._one_by_one()

    async def _one_by_one(self) -> AsyncIterator[str]:
        async for chunks in self.batches():
            for chunk in chunks:
                yield chunk

    def batches(self) -> AsyncIterator[list[str]]:
        """Lists of chunks, one list per wakeup (never empty)."""
        self._gen = self._batches()
        return self._gen

    async def _batches(self) -> AsyncIterator[list[str]]:
        pending = self._pending
        try:
            while True:
                chunks, final = [], False
                for out in await pending.stream.next_batch():
                    if out.error is not None:
                        if chunks:
                            yield chunks
                        raise out.error
                    chunks += pending.chunks_json(out)
                    if out.final:
                        final = True
                        break
                if chunks:
                    yield chunks
                if final:
                    return
        finally:
            self._engine.abort(pending.request_id)

    async def aclose(self) -> None:
        """Stop early (the request is aborted, its KV pages freed)."""
        if self._gen is not None:
            await self._gen.aclose()
        else:
            self._engine.abort(self._pending.request_id)


class _AsyncCreate:
    """`await create(**openai_kwargs)` of `chat.completions` or `completions` (asyncio)."""

    def __init__(self, engine: _EngineBase, start: Callable[[dict], _Pending]):
        self._engine, self._start = engine, start

    async def create(self, request: P.ChatCompletionRequest | P.CompletionRequest | None = None,
                     /, **kwargs: Any):
        """OpenAI's `create(**kwargs)`: the response object, or with stream=True an async
        iterator of chunks. A request already parsed by the protocol may be passed instead.
        `extra_body={...}` adds fields as the openai client does (e.g. `debug_config`)."""
        pending = self._start(_request_args(request, kwargs))
        if pending.streaming:
            return self._iterate(pending)
        return await self._collect(pending)

    async def _iterate(self, pending: _Pending):
        try:
            async for out in pending.stream:
                for chunk in pending.chunks(out):
                    yield chunk
        finally:
            self._engine.abort(pending.request_id)

    async def serve(self, request: P.ChatCompletionRequest | P.CompletionRequest):
        """The response object, or for a stream a `ChunkStream` of chunks as JSON text."""
        pending = self._start(request)
        if pending.streaming:
            return ChunkStream(self._engine, pending)
        return await self._collect(pending)

    async def _collect(self, pending: _Pending):
        try:
            outs = [out async for out in pending.stream]
        except asyncio.CancelledError:
            self._engine.abort(pending.request_id)
            raise
        return pending.response(outs)


class AsyncMLCEngine(_EngineBase):
    """The asyncio engine: `await engine.chat.completions.create(...)`; concurrent requests
    are batched into the same decode steps."""

    _stream_class = _AsyncStream

    def __init__(self, model: str, device: str = "auto", **kwargs: Any):
        super().__init__(model, device, **kwargs)
        self.chat = _Namespace(completions=_AsyncCreate(self, self._start_chat))
        self.completions = _AsyncCreate(self, self._start_completion)
        self.embeddings = E.AsyncEmbeddings(self._start_embeddings, self._embeddings_response)
        self._generate = _AsyncCreate(self, self._start_generate)

    async def generate(self, prompt: str | list[int], **kwargs: Any
                       ) -> AsyncIterator[RequestOutput]:
        """The engine's own outputs for a completion request (token ids and text per step,
        per choice), without OpenAI's response shapes; kwargs are `completions.create`'s."""
        return await self._generate.create(prompt=prompt, **kwargs, stream=True)

    async def serve_request(self, request: P.ChatCompletionRequest | P.CompletionRequest):
        """The HTTP server's entry: a parsed request -> its response object, or for a stream
        a `ChunkStream`: an async iterator of chunks as JSON text (no response objects per
        token), whose `batches()` gives every chunk ready at a wakeup at once."""
        api = self.chat.completions if isinstance(request, P.ChatCompletionRequest) \
            else self.completions
        return await api.serve(request)


__all__ = ["MLCEngine", "AsyncMLCEngine", "EngineConfig", "ChunkStream"]
