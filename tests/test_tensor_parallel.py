"""Tensor parallelism on the CPU: the sharded weight layout and its arithmetic.

No collective backend runs on the CPU, so the all-reduce is emulated in numpy: each shard
computes its partial output from its own weight slices and the partials are summed. The
library built for 2 shards is only built and its metadata read.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import hf_logits, make_tiny_llama

from mlc.cli.main import cli
from mlc.compiler.compile import compile_model
from mlc.compiler.convert import convert
from mlc.compiler.quantization import quantized_param_names
from mlc.compiler.tensor_parallel import ShardSpec, shard, shard_name, unshard
from mlc.errors import CompileError, ConvertError
from mlc.models import llama_loader
from mlc.models.registry import get_model
from mlc.support.tensor_cache import TensorCache

SHARDS = 2
PROMPT = [5, 17, 250, 3, 99, 42, 7]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, Config, {q0f32 unsharded dir, q0f32 2-shard dir, q4f16_1 2-shard dir})."""
    root = tmp_path_factory.mktemp("tp")
    hf, hf_dir = make_tiny_llama(root)
    dirs = {"full": convert(str(hf_dir), "q0f32", root / "full", quiet=True)}
    for q in ("q0f32", "q4f16_1"):
        dirs[q] = convert(str(hf_dir), q, root / f"tp2-{q}", quiet=True,
                          overrides=f"tensor_parallel_shards={SHARDS}")
    dirs["q4_full"] = convert(str(hf_dir), "q4f16_1", root / "q4-full", quiet=True)
    config = get_model("llama").config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    return hf, hf_dir, config, dirs


def test_shard_of_fused_matrix_takes_a_slice_of_each_segment():
    w = np.arange(12)[:, None] * np.ones((1, 3))                 # rows 0..11
    spec = ShardSpec(0, (4, 4, 4))                               # q, k, v of 4 rows each
    a, b = shard(w, spec, 2)
    assert a[:, 0].tolist() == [0, 1, 4, 5, 8, 9] and b[:, 0].tolist() == [2, 3, 6, 7, 10, 11]
    np.testing.assert_array_equal(unshard([a, b], spec), w)
    cols = np.arange(8)[None, :] * np.ones((3, 1))
    a, b = shard(cols, ShardSpec(1), 2)
    assert a[0].tolist() == [0, 1, 2, 3] and b[0].tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("quantization", ["q0f32", "q4f16_1"])
def test_sharded_weights_reassemble_exactly(tiny, quantization):
    _, _, config, dirs = tiny
    full = TensorCache(dirs["full" if quantization == "q0f32" else "q4_full"])
    tp = TensorCache(dirs[quantization])
    specs = llama_loader.shard_specs(config)
    seen = set()
    for pm in get_model("llama").param_mapping(config):
        names = (quantized_param_names(pm.mlc_name) if pm.quantize and quantization != "q0f32"
                 else (pm.mlc_name,))
        for name in names:
            spec = specs.get(pm.mlc_name)
            if spec is None:                                    # replicated: same name
                np.testing.assert_array_equal(tp.get(name), full.get(name))
                seen.add(name)
                continue
            assert name not in tp
            pieces = [tp.get(shard_name(name, i)) for i in range(SHARDS)]
            seen.update(shard_name(name, i) for i in range(SHARDS))
            ref = full.get(name)
            for p in pieces:                                    # per-shard shapes
                d = spec.dim
                assert p.shape[d] * SHARDS == ref.shape[d] and p.dtype == ref.dtype, name
            np.testing.assert_array_equal(unshard(pieces, spec), ref, err_msg=name)
    assert seen == set(tp.names())
    chat = json.loads((dirs[quantization] / "mlc-chat-config.json").read_text())
    assert chat["tensor_parallel_shards"] == SHARDS
    assert chat["model_config"]["tensor_parallel_shards"] == SHARDS


# ---------------------------------------------------------------- numpy forward (emulated)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, theta):                                            # x [heads, s, d], HF halves
    s, d = x.shape[1], x.shape[2]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.arange(s)[:, None] * inv[None]                     # [s, d/2]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _attention_part(h, qkv_w, o_w, hq, hkv, d, theta):
    """One worker's attention on its `hq` query / `hkv` KV heads -> partial o_proj output."""
    s = h.shape[0]
    qkv = h @ qkv_w.T
    q = qkv[:, : hq * d].reshape(s, hq, d).transpose(1, 0, 2)
    k = qkv[:, hq * d: (hq + hkv) * d].reshape(s, hkv, d).transpose(1, 0, 2)
    v = qkv[:, (hq + hkv) * d:].reshape(s, hkv, d).transpose(1, 0, 2)
    q, k = _rope(q, theta), _rope(k, theta)
    group = hq // hkv
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ v                    # [hq, s, d]
    return out.transpose(1, 0, 2).reshape(s, hq * d) @ o_w.T


def _mlp_part(h, gate_up_w, down_w):
    gate, up = np.split(h @ gate_up_w.T, 2, axis=-1)
    return (gate / (1 + np.exp(-gate)) * up) @ down_w.T


def _forward(get, config, tokens, shards):
    """Logits of `tokens` in float64; `get(name, i)` is shard i of a parameter (or the whole
    parameter when unsharded). The sum over shards is the all-reduce."""
    c = config
    hq, hkv, d = c.num_attention_heads // shards, c.num_key_value_heads // shards, c.head_dim
    x = get("model.embed_tokens.weight", None)[tokens]
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}"
        h = _rms(x, get(f"{p}.input_layernorm.weight", None), c.rms_norm_eps)
        x = x + sum(_attention_part(h, get(f"{p}.self_attn.qkv_proj.weight", i),
                                    get(f"{p}.self_attn.o_proj.weight", i), hq, hkv, d,
                                    c.rope_theta) for i in range(shards))
        h = _rms(x, get(f"{p}.post_attention_layernorm.weight", None), c.rms_norm_eps)
        x = x + sum(_mlp_part(h, get(f"{p}.mlp.gate_up_proj.weight", i),
                              get(f"{p}.mlp.down_proj.weight", i)) for i in range(shards))
    return _rms(x, get("model.norm.weight", None), c.rms_norm_eps) @ get("lm_head.weight",
                                                                          None).T


def test_sharded_forward_equals_unsharded(tiny):
    hf, _, config, dirs = tiny
    full, tp = TensorCache(dirs["full"]), TensorCache(dirs["q0f32"])

    def get_full(name, _i):
        return full.get(name).astype(np.float64)

    def get_shard(name, i):
        return (tp.get(name) if i is None else tp.get(shard_name(name, i))).astype(np.float64)

    ref = _forward(get_full, config, PROMPT, 1)
    # the emulation itself is right: it matches transformers
    hf_ref = hf_logits(hf, PROMPT)
    assert np.abs(ref - hf_ref).max() / np.ptp(hf_ref) < 1e-4
    ours = _forward(get_shard, config, PROMPT, SHARDS)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- compile


def test_export_has_one_allreduce_per_block_and_per_shard_shapes(tiny):
    import dataclasses

    from tvm.target import Target

    from mlc.compiler.quantization import get_quantization

    _, _, config, _ = tiny
    info, q = get_model("llama"), get_quantization("q0f32")

    def export(cfg):
        model = info.build(cfg, q)
        with Target("llvm"):
            return model.export_tvm(spec=model.get_default_spec("llvm"))

    mod1, params1 = export(config)
    mod2, params2 = export(dataclasses.replace(config, tensor_parallel_shards=SHARDS))
    assert "ccl" not in mod1.script()
    decode = mod2["decode"].script()
    assert decode.count("R.ccl.allreduce") == 2 * config.num_hidden_layers
    assert [n for n, _ in params1] == [n for n, _ in params2]
    shapes = {n: tuple(int(s) for s in p.shape) for n, p in params2}
    d = config.head_dim
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (
        (config.num_attention_heads + 2 * config.num_key_value_heads) * d // SHARDS,
        config.hidden_size)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (
        config.hidden_size, config.intermediate_size // SHARDS)


def test_cli_compile_tp2_lists_per_shard_shapes(tiny, tmp_path):
    from mlc.runtime.model import read_library_metadata

    _, _, _, dirs = tiny
    out = tmp_path / "tp2.so"
    result = CliRunner().invoke(cli, [
        "compile", str(dirs["full"]), "--device", "cpu", "-o", str(out), "--opt", "O0",
        "--overrides", f"tensor_parallel_shards={SHARDS}", "--quiet"])
    assert result.exit_code == 0, result.output
    meta = read_library_metadata(out)
    assert meta["tensor_parallel_shards"] == SHARDS
    records = TensorCache(dirs["q0f32"]).records
    # every library parameter is a stored tensor, or shard 0 of one, with the same shape
    for p in meta["params"]:
        rec = records.get(p["name"]) or records[shard_name(p["name"], 0)]
        assert p["shape"] == list(rec.shape), p["name"]


def test_heads_not_divisible_is_a_clear_error(tiny, tmp_path):
    _, hf_dir, _, dirs = tiny
    with pytest.raises(ConvertError, match="tensor_parallel_shards=3 does not divide "
                                           "num_attention_heads=4, num_key_value_heads=2"):
        convert(str(hf_dir), "q0f32", tmp_path / "bad", quiet=True,
                overrides="tensor_parallel_shards=3")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(CompileError, match="Use one of \\[2\\] or 1"):
        compile_model(dirs["full"], "cpu", tmp_path / "x.so",
                      overrides="tensor_parallel_shards=3")
    with pytest.raises(ConvertError, match="positive integer"):
        convert(str(hf_dir), "q0f32", tmp_path / "bad", quiet=True,
                overrides="tensor_parallel_shards=0")
