"""What every causal LM exports: the library contract shared by all architectures.

A model file subclasses `CausalLMBase` and supplies `embed`, `body` (embeddings -> final hidden
states through the paged KV cache), `logits` and `create_paged_kv_cache`. This base derives
prefill/decode/batch_* from them, adds the device-side sampling helpers, and builds the export
spec, so no architecture copies these.
"""

from __future__ import annotations

import contextlib

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm import kv_cache as kv_mod
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

PAGE_SIZE = 16  # the only page size TVM 0.27's paged KV cache runs with


class PagedKVCacheOwner(nn.Module):
    """A module whose library creates its paged KV cache: the architecture says only its
    layout (`kv_cache_layout`: the keyword arguments of `create_kv_cache`)."""

    def kv_cache_layout(self) -> dict:
        raise NotImplementedError

    def create_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size,
                              page_size, support_sliding_window):
        return create_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size,
                               page_size, support_sliding_window, **self.kv_cache_layout())


class CausalLMBase(PagedKVCacheOwner):
    """The library contract: embed, prefill, decode, batch_prefill/decode/verify, sampling."""

    def __init__(self, config, quantization):
        super().__init__()
        self.config = config
        self.quantization = quantization
        self.dtype = quantization.model_dtype

    # -- supplied by the architecture ------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:           # [n] -> [n, hidden]
        raise NotImplementedError

    def body(self, input_embeds: Tensor, kv_cache) -> Tensor:  # [b, s, h] -> [b, s, h]
        raise NotImplementedError

    def logits(self, hidden: Tensor) -> Tensor:             # [..., h] -> [..., vocab] float32
        raise NotImplementedError

    def final_norm(self, hidden: Tensor) -> Tensor:         # [..., h] -> [..., h]
        """`body`'s output as the final (normed) hidden states that `logits` projects: the
        identity where `body` ends with the final norm (Phi keeps it in its lm_head)."""
        return hidden

    # -- derived ---------------------------------------------------------------------------
    def prefill(self, input_embeds: Tensor, paged_kv_cache):
        """One sequence's prompt chunk [1, s, h] -> logits of its last position [1, 1, v]."""
        hidden = self.body(input_embeds, paged_kv_cache)

        def last(h):
            b, s, d = h.shape
            return te.compute((b, 1, d), lambda i, _, k: h[i, s - 1, k], name="last_token")

        hidden = op.tensor_expr_op(last, "take_last_token", [hidden])
        return self.logits(hidden), paged_kv_cache

    def decode(self, input_embeds: Tensor, paged_kv_cache):
        """One token of one sequence [1, 1, h] -> logits [1, 1, v]."""
        return self.logits(self.body(input_embeds, paged_kv_cache)), paged_kv_cache

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache):
        """Ragged prompt chunks of several sequences concatenated [1, s, h]; logits at
        `logit_positions` (the last token of each sequence) -> [1, b, v]."""
        hidden = self.body(input_embeds, paged_kv_cache)
        hidden = op.take(hidden, logit_positions, axis=1)
        return self.logits(hidden), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache):
        """One token for each of b sequences [b, 1, h] -> logits [b, 1, v]."""
        return self.logits(self.body(input_embeds, paged_kv_cache)), paged_kv_cache

    def batch_verify(self, input_embeds: Tensor, paged_kv_cache):
        """Draft-token trees of several sequences [1, s, h] -> logits at every position."""
        return self.logits(self.body(input_embeds, paged_kv_cache)), paged_kv_cache

    # -- hidden states (EAGLE drafting: the head reads the target's final hidden states) -----
    def batch_prefill_to_last_hidden_states(self, input_embeds: Tensor, paged_kv_cache):
        """Ragged prompt chunks [1, s, h] -> the final hidden states (after the last norm,
        what the LM head reads) at every position [1, s, h]."""
        return self.body(input_embeds, paged_kv_cache), paged_kv_cache

    def batch_decode_to_last_hidden_states(self, input_embeds: Tensor, paged_kv_cache):
        """One token for each of b sequences [b, 1, h] -> final hidden states [b, 1, h]."""
        return self.body(input_embeds, paged_kv_cache), paged_kv_cache

    def batch_verify_to_last_hidden_states(self, input_embeds: Tensor, paged_kv_cache):
        """Draft chains of several sequences [1, s, h] -> final hidden states [1, s, h]."""
        return self.body(input_embeds, paged_kv_cache), paged_kv_cache

    def get_logits(self, hidden_states: Tensor, logit_positions: Tensor):
        """Logits of the rows `logit_positions` [b] of final hidden states [n, h] -> [b, v]
        (the target's LM head, also applied to an EAGLE head's outputs)."""
        return self.logits(op.take(hidden_states, logit_positions, axis=0))

    def batch_prefill_hidden_states(self, input_embeds: Tensor, paged_kv_cache):
        """Ragged prompt chunks of several sequences [1, s, h] -> the final (normed) hidden
        state of every position [1, s, h] float32, for embeddings (no logits computed)."""
        hidden = self.final_norm(self.body(input_embeds, paged_kv_cache))
        return op.astype(hidden, "float32"), paged_kv_cache

    # -- sampling helpers (no parameters) --------------------------------------------------
    def softmax_with_temperature(self, logits: Tensor, temperature: Tensor):
        """logits [b, 1, v] float32, temperature [b] (> 0) -> probabilities [b, 1, v]."""
        b, _, v = logits.shape
        t = op.reshape(temperature, (b, 1, 1))
        return op.softmax(op.divide(logits, t), axis=-1)

    def apply_logit_bias(self, logits: Tensor, bias: Tensor):
        """logits [b, v] + bias [b, v] (penalties and logit_bias folded in by the engine)."""
        return op.add(logits, bias)

    def renormalize_by_top_p_top_k(self, probs: Tensor, top_p: Tensor, top_k: Tensor):
        """Zero what falls outside top-p/top-k and renormalize: probs [b, v] -> [b, v]."""
        sorted_probs = op.sort(probs, axis=-1, descending=True)
        return op.renormalize_top_p_top_k_prob(probs, sorted_probs,
                                               op.reshape(top_p, (probs.shape[0], 1)),
                                               op.reshape(top_k, (probs.shape[0], 1)))

    def sample_with_top_p_top_k(self, probs: Tensor, top_p: Tensor, top_k: Tensor,
                                uniform: Tensor):
        """Draw one token per row: probs [b, v], top_p [b] f32, top_k [b] i32, uniform [b]."""
        b = probs.shape[0]
        sorted_probs, sorted_index = op.sort(probs, -1, True), op.argsort(probs, -1, True)
        col = lambda x: op.reshape(x, (b, 1))
        rows = col(op.arange(0, b, dtype="int64"))  # a symbolic batch needs explicit indices
        return op.reshape(op.sample_top_p_top_k_from_sorted_prob(
            sorted_probs, sorted_index, col(top_p), col(top_k), col(uniform), rows), (b,))

    def argmax(self, logits: Tensor):
        """Greedy tokens: logits [b, v] -> [b] int32."""
        return op.reshape(op.topk(logits, 1, -1, "indices"), (logits.shape[0],))

    # -- export ----------------------------------------------------------------------------
    def get_default_spec(self, target_kind: str):
        """The export spec of every function of the library contract."""
        h, v = self.config.hidden_size, self.config.vocab_size
        packed = {"$": {"param_mode": "packed", "effect_mode": "none"}}
        plain = {"$": {"param_mode": "none", "effect_mode": "none"}}
        kv = nn.spec.Object(object_type=kv_mod.PagedKVCache)
        f32, i32 = "float32", "int32"
        spec = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], i32), **packed},
            "prefill": {"input_embeds": nn.spec.Tensor([1, "seq_len", h], self.dtype),
                        "paged_kv_cache": kv, **packed},
            "decode": {"input_embeds": nn.spec.Tensor([1, 1, h], self.dtype),
                       "paged_kv_cache": kv, **packed},
            "batch_prefill": {"input_embeds": nn.spec.Tensor([1, "seq_len", h], self.dtype),
                              "logit_positions": nn.spec.Tensor(["batch_size"], i32),
                              "paged_kv_cache": kv, **packed},
            "batch_decode": {"input_embeds": nn.spec.Tensor(["batch_size", 1, h], self.dtype),
                             "paged_kv_cache": kv, **packed},
            "batch_verify": {"input_embeds": nn.spec.Tensor([1, "seq_len", h], self.dtype),
                             "paged_kv_cache": kv, **packed},
            **self.hidden_state_spec(kv, packed),
            "batch_prefill_hidden_states": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", h], self.dtype),
                "paged_kv_cache": kv, **packed},
            "create_paged_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                "page_size": int, "support_sliding_window": int, **plain},
            "softmax_with_temperature": {
                "logits": nn.spec.Tensor(["batch_size", 1, v], f32),
                "temperature": nn.spec.Tensor(["batch_size"], f32), **plain},
            "apply_logit_bias": {"logits": nn.spec.Tensor(["batch_size", v], f32),
                                 "bias": nn.spec.Tensor(["batch_size", v], f32), **plain},
            "sample_with_top_p_top_k": {
                "probs": nn.spec.Tensor(["batch_size", v], f32),
                "top_p": nn.spec.Tensor(["batch_size"], f32),
                "top_k": nn.spec.Tensor(["batch_size"], i32),
                "uniform": nn.spec.Tensor(["batch_size"], f32), **plain},
            "argmax": {"logits": nn.spec.Tensor(["batch_size", v], f32), **plain},
        }
        if target_kind != "llvm":
            # TVM 0.27's renormalize kernel builds for GPUs only (invalid IR on llvm).
            spec["renormalize_by_top_p_top_k"] = {
                "probs": nn.spec.Tensor(["batch_size", v], f32),
                "top_p": nn.spec.Tensor(["batch_size"], f32),
                "top_k": nn.spec.Tensor(["batch_size"], i32), **plain}
        if target_kind == "webgpu":
            # TVM 0.27's GPU sort/top-k kernels launch blockIdx.z, which WebGPU lacks: sample
            # on the host there.
            for name in ("sample_with_top_p_top_k", "argmax", "renormalize_by_top_p_top_k"):
                del spec[name]
        return spec


    def hidden_state_spec(self, kv, packed: dict) -> dict:
        """The export spec of the hidden-state functions (EAGLE speculative decoding)."""
        h = self.config.hidden_size
        ragged = nn.spec.Tensor([1, "seq_len", h], self.dtype)
        return {
            "batch_prefill_to_last_hidden_states": {"input_embeds": ragged,
                                                    "paged_kv_cache": kv, **packed},
            "batch_decode_to_last_hidden_states": {
                "input_embeds": nn.spec.Tensor(["batch_size", 1, h], self.dtype),
                "paged_kv_cache": kv, **packed},
            "batch_verify_to_last_hidden_states": {"input_embeds": ragged,
                                                   "paged_kv_cache": kv, **packed},
            "get_logits": {"hidden_states": nn.spec.Tensor(["seq_len", h], self.dtype),
                           "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                           **packed},
        }


@contextlib.contextmanager
def _cpu_tree_attention_fix():
    """TVM 0.27's llvm branch passes the two tree-attention kernels in swapped order (any CPU
    tree verification then fails with "Expected 16 arguments"); swap the factories back while
    the cache is built. The GPU branch is correct and unaffected."""
    a, b = kv_mod.tree_attn_cpu, kv_mod.tree_attn_with_paged_kv_cache_cpu
    kv_mod.tree_attn_cpu, kv_mod.tree_attn_with_paged_kv_cache_cpu = b, a
    try:
        yield
    finally:
        kv_mod.tree_attn_cpu, kv_mod.tree_attn_with_paged_kv_cache_cpu = a, b


# The window TVM's cache is given when no layer slides (it builds sliding kernels regardless).
UNUSED_LAYER_WINDOW = 1024


def kv_cache_window(sliding_window: int | None) -> int:
    """The layer window size a model's KV cache (and its CPU attention kernels) is built with."""
    return sliding_window if sliding_window and sliding_window > 0 else UNUSED_LAYER_WINDOW


def cache_attention_kinds(kinds: list[str]) -> list[str]:
    """The per-layer kinds the cache is built with: the model's, plus one unused "mha" layer
    when every layer slides. TVM 0.27 allocates its q/k/v scratch only when some layer is
    plain "mha" (a cache of only "mha_sliding" layers crashes in CreateView)."""
    bad = sorted(set(kinds) - {"mha", "mha_sliding"})
    if bad:
        raise ValueError(f"attention kinds {bad}: only 'mha' and 'mha_sliding' are supported")
    return list(kinds) + (["mha"] if kinds and all(k == "mha_sliding" for k in kinds) else [])


def create_kv_cache(model: PagedKVCacheOwner, max_batch_size, max_total_seq_len,
                    prefill_chunk_size, page_size, support_sliding_window, *, num_q_heads,
                    num_kv_heads, head_dim,
                    attention_kinds: list[str], sliding_window: int = -1,
                    rope_mode: RopeMode = RopeMode.NORMAL, rope_theta: float = 10000.0,
                    rope_scaling: dict | None = None, rotary_dim: int | None = None):
    """A TIR paged KV cache for multi-head/grouped-query attention.

    `attention_kinds` gives each layer's kind ("mha", or "mha_sliding" with the window
    `sliding_window`; TVM takes one window for all sliding layers). With `RopeMode.NORMAL` the
    cache rotates q and k itself, with one `rope_theta`/`rope_scaling` for every layer, over the
    first `rotary_dim` features of each head (default: all; partial rotary otherwise). A model
    whose layers need different rotations applies RoPE itself and passes `RopeMode.NONE`.
    """
    from tvm.target import Target

    if rope_mode not in (RopeMode.NORMAL, RopeMode.NONE):
        # mlc's CPU attention kernels assume no rotation inside attention (rotary_mode 0).
        raise ValueError("rope_mode must be RopeMode.NORMAL or RopeMode.NONE")
    target = Target.current()
    kinds = cache_attention_kinds(attention_kinds)
    fix = _cpu_tree_attention_fix() if target.kind.name == "llvm" else contextlib.nullcontext()
    with fix:
        return TIRPagedKVCache(
            attn_kind=kinds, max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len, prefill_chunk_size=prefill_chunk_size,
            page_size=page_size, support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, len(kinds)]), num_hidden_layers=len(kinds),
            num_attention_heads=num_q_heads, num_key_value_heads=num_kv_heads,
            qk_head_dim=head_dim, v_head_dim=head_dim, mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0, rope_mode=rope_mode, rope_scale=1,
            rope_theta=rope_theta, rope_scaling=rope_scaling or {},
            rope_ext_factors=rx.prim_value(0), rotary_dim=rotary_dim or head_dim,
            enable_disaggregation=False, dtype=model.dtype, target=target,
            layer_sliding_window_size=kv_cache_window(sliding_window))


def apply_rope(x: Tensor, positions: Tensor, theta: float, rotary_dim: int | None = None,
               position_scale: float = 1.0) -> Tensor:
    """Rotate the first `rotary_dim` features of every head of x [b, s, h, d] by its position
    (positions [b * s] int32, the KV cache's `get_query_positions`), rotate-half style as
    transformers does, in float32. `position_scale` divides positions ("linear" scaling).
    For models that apply RoPE themselves (KV cache with RopeMode.NONE)."""
    import numpy as np

    rd = rotary_dim or int(x.shape[-1])
    half = rd // 2
    # transformers' inverse frequencies, bit for bit: 1 / theta ** (2i / rd) in float32
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, rd, 2, dtype=np.float32)
                                              / np.float32(rd)))).astype("float32")
    inv = Tensor.from_const(inv_freq)
    scale = 1.0 / position_scale

    def rope(x, pos, inv):
        s = x.shape[1]             # the TE tensor's own (symbolic) sequence length

        def value(bi, si, hi, di):
            p = pos[bi * s + si].astype("float32")
            if scale != 1.0:
                p = p * tirx.const(scale, "float32")
            angle = p * inv[di % half]
            xf = x[bi, si, hi, di].astype("float32")
            partner = tirx.if_then_else(di < half, -x[bi, si, hi, di + half].astype("float32"),
                                        x[bi, si, hi, di - half].astype("float32"))
            rotated = xf * tirx.cos(angle) + partner * tirx.sin(angle)
            return tirx.if_then_else(di < rd, rotated, xf).astype(x.dtype)

        return te.compute(x.shape, value, name="rope")

    return op.tensor_expr_op(rope, "rope", [x, positions, inv])
