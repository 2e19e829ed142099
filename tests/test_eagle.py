"""EAGLE speculative decoding (`speculative_mode="eagle"`) on a tiny random Llama.

The heads are written as the published ones are (`pytorch_model.bin`, EAGLE's names) and go
through `mlc convert` and `mlc compile`. No published head can be downloaded here, so:
- the head's forward is checked against a torch implementation of EAGLE's published
  architecture written in this file (and the target's exported hidden states against
  transformers'), so a converted head computes what a published head expects;
- a random head: output identical token for token to the plain engine (greedy, batched with
  requests that never draft, prefix caching and preemption), and seeded sampling follows the
  target's distribution (chi-square);
- an *exact* head for a context-free target (attention and MLP outputs zeroed, so the target
  is a bigram model; the head's fc passes the next token's embedding through): every greedy
  draft is accepted, which exercises the accept path; the rate reaches stats(), /metrics and
  the trace; with sampling, steps accept part of their drafts, and seeded outputs still equal
  the plain engine's;
- bad heads and old target libraries are refused with errors that name the fix.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from helpers import (
    build_lib,
    hf_logits,
    make_context_free_llama,
    make_exact_eagle_head,
    make_tiny_eagle_head,
    make_tiny_llama,
    write_mlc_dir,
)
from test_engine import LONG_PROMPT, OTHER_PROMPTS, assert_idle_and_freed
from test_speculative import REPEATING, ids, stream_text

from mlc.compiler.convert import convert
from mlc.errors import ConvertError, ModelLoadError
from mlc.runtime.engine import MLCEngine
from mlc.runtime.memory_plan import DraftNeeds, plan_memory
from mlc.runtime.model import KVCacheConfig, LoadedHead, LoadedModel

# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf target, target MLC dir, its library, head HF dir, head MLC dir, head library)."""
    tmp = tmp_path_factory.mktemp("tiny-eagle")
    hf_model, hf_dir = make_tiny_llama(tmp)
    mlc_dir = write_mlc_dir(hf_model, tmp / "mlc", "q0f32", hf_dir=hf_dir)
    head_hf = make_tiny_eagle_head(tmp, hf_model)
    head_dir = convert(str(head_hf), "q0f32", tmp / "head-mlc", quiet=True)
    return hf_model, mlc_dir, build_lib(mlc_dir), head_hf, head_dir, build_lib(head_dir)


def make_engine(tiny, head=None, **kwargs) -> MLCEngine:
    _, mlc_dir, lib, _, head_dir, head_lib = tiny
    if head is None:
        head = f"{head_dir}:{head_lib}"
    if kwargs.get("speculative_mode", "eagle") == "eagle":
        kwargs.setdefault("additional_models", [head])
    kwargs.setdefault("speculative_mode", "eagle")
    return MLCEngine(str(mlc_dir), "cpu", model_lib=str(lib), **kwargs)


@pytest.fixture(scope="module")
def plain(tiny):
    eng = make_engine(tiny, speculative_mode="disable", prefix_cache_mode="disable")
    yield eng
    eng.terminate()


@pytest.fixture(scope="module")
def eagle(tiny):
    eng = make_engine(tiny, spec_draft_length=3, enable_tracing=True)
    yield eng
    eng.terminate()


# ------------------------------------------------------------------------------ the reference


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [s, heads, d] rotated rotate-half style by positions 0 .. s - 1."""
    s, _, d = x.shape
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]      # [s, d/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None].float()
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None].float()
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def head_reference(sd: dict, cfg: dict, tokens: list[int], feats: torch.Tensor) -> torch.Tensor:
    """EAGLE's published head on one sequence, from its architecture (cnets.py): position j
    reads embed(tokens[j]) and feats[j]; fc, then Llama layers with causal attention (layer 0
    without input norm), no final norm. Returns the outputs at every position [s, h]."""
    h, nq, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, eps, s = h // nq, cfg["rms_norm_eps"], len(tokens)
    emb = sd["embed_tokens.weight"][torch.tensor(tokens)]
    x = torch.cat([emb, feats], -1) @ sd["fc.weight"].T
    if "fc.bias" in sd:
        x = x + sd["fc.bias"]
    mask = torch.full((s, s), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        a = rms_norm(x, sd[p + "input_layernorm.weight"], eps) if i > 0 else x
        q = rope((a @ sd[p + "self_attn.q_proj.weight"].T).view(s, nq, d), cfg["rope_theta"])
        k = rope((a @ sd[p + "self_attn.k_proj.weight"].T).view(s, nkv, d), cfg["rope_theta"])
        v = (a @ sd[p + "self_attn.v_proj.weight"].T).view(s, nkv, d)
        k, v = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
        att = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5 + mask
        out = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(s, h)
        x = x + out @ sd[p + "self_attn.o_proj.weight"].T
        m = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = m @ sd[p + "mlp.gate_proj.weight"].T, m @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return x


def test_head_and_target_hidden_states_match_the_references(tiny):
    hf_model, mlc_dir, lib, head_hf, head_dir, head_lib = tiny
    sd = torch.load(head_hf / "pytorch_model.bin", weights_only=True)
    cfg = json.loads((head_hf / "config.json").read_text())
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 300, n).tolist() for n in (11, 6)]      # random tokens, 2 lengths
    target = LoadedModel(mlc_dir, lib, "cpu")
    target.create_kv_cache(KVCacheConfig(4, 256, 64))
    target.enable_hidden_states()
    head = LoadedHead(head_dir, head_lib, "cpu")
    head.create_kv_cache(KVCacheConfig(4, 256, 64))
    with torch.no_grad():
        ref_feats = [hf_model.model(torch.tensor([s])).last_hidden_state[0] for s in seqs]
    # the target: final hidden states (after the last norm) of every position; logits
    for i in range(2):
        target.add_sequence(i)
    logits = target.prefill_logits([0, 1], seqs).numpy()
    feats = np.split(target.last_hidden, [len(seqs[0])])
    for f, ref, s, lg in zip(feats, ref_feats, seqs, logits):
        np.testing.assert_allclose(f, ref.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(lg, hf_logits(hf_model, s)[-1], rtol=1e-4, atol=1e-4)
    # the head: position j pairs token s[j + 1] with feature f_j; outputs at the last ones
    for i in range(2):
        head.add_sequence(i)
    out = head.prefill_hidden([0, 1], [s[1:] for s in seqs],
                              np.concatenate([f[:-1] for f in feats]))
    refs = [head_reference(sd, cfg, s[1:], torch.from_numpy(f[:-1])) for s, f in zip(seqs, feats)]
    for o, r in zip(out, refs):
        np.testing.assert_allclose(o, r[-1].numpy(), rtol=1e-4, atol=1e-4)
    # a draft step: the head's own output as the feature, with a new token
    new = [7, 9]
    step = head.decode_hidden([0, 1], new, out)
    for o, s, f, r, t in zip(step, seqs, feats, refs, new):
        full = head_reference(sd, cfg, s[1:] + [t],
                              torch.cat([torch.from_numpy(f[:-1]), r[-1:]]))
        np.testing.assert_allclose(o, full[-1].numpy(), rtol=1e-4, atol=1e-4)
    # the head's output through the target's LM head: what gives the draft token
    got = target.hidden_logits(step, [0, 1]).numpy()
    want = hf_model.lm_head(torch.from_numpy(step)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ the engine


def test_greedy_output_is_identical_alone_and_batched(plain, eagle):
    prompts = [REPEATING, LONG_PROMPT[:80], "Hello"]
    kws = (dict(temperature=0), dict(temperature=0, n=2),
           dict(temperature=0, frequency_penalty=0.5))
    before = eagle.stats()
    for p in prompts:
        for kw in kws:
            assert ids(eagle, p, **kw) == ids(plain, p, **kw), (p, kw)
    st = eagle.stats()
    assert st.draft_tokens > before.draft_tokens
    # one continuous batch: long requests that draft, short ones (max_tokens 2) that never do
    prompts = [REPEATING, LONG_PROMPT] + OTHER_PROMPTS
    lengths = [30, 25, 2, 30, 2, 20]
    want = [plain.completions.create(prompt=p, temperature=0, max_tokens=n, ignore_eos=True)
            .choices[0].text for p, n in zip(prompts, lengths)]
    streams = [eagle.completions.create(prompt=p, temperature=0, max_tokens=n, stream=True,
                                        ignore_eos=True) for p, n in zip(prompts, lengths)]
    assert [stream_text(s)[0] for s in streams] == want


def test_prefix_cache_and_preemption_keep_the_output(tiny, plain):
    eng = make_engine(tiny, spec_draft_length=4, max_total_sequence_length=160)
    try:
        initial = eng.stats().kv_pages_free
        prompts = [REPEATING, REPEATING + " add", LONG_PROMPT[:120], REPEATING[:60]]
        want = [plain.tokenizer.decode(ids(plain, p, max_tokens=50)[0]) for p in prompts]
        for _ in range(2):          # the second round forks cached prefixes
            streams = [eng.completions.create(prompt=p, temperature=0, max_tokens=50,
                                              ignore_eos=True, stream=True) for p in prompts]
            assert [stream_text(s)[0] for s in streams] == want
        st = eng.stats()
        assert st.preemptions > 0 and st.prefix_cached_tokens > 0 and st.draft_tokens > 0
        assert_idle_and_freed(eng, initial)
        assert not eng._core.scheduler.drafter.state      # every head sequence released
    finally:
        eng.terminate()


def test_sampling_follows_the_targets_distribution(tiny, eagle):
    """Seeded sampling at temperature 1: the second token (the first one a verify step
    accepts or draws), given the most frequent first token, follows transformers'
    distribution (chi-square over the likely tokens plus one bin for the rest)."""
    hf_model = tiny[0]
    prompt = eagle.tokenizer.encode("The quick brown", add_special_tokens=False).ids
    runs = 500
    pairs = [ids(eagle, prompt, temperature=1.0, seed=t, max_tokens=4)[0][:2]
             for t in range(runs)]
    first = np.bincount([p[0] for p in pairs], minlength=320)
    mode = int(first.argmax())
    seconds = [p[1] for p in pairs if p[0] == mode]
    p0 = torch.softmax(torch.from_numpy(hf_logits(hf_model, prompt)[-1]), -1).numpy()
    p1 = torch.softmax(torch.from_numpy(hf_logits(hf_model, prompt + [mode])[-1]), -1).numpy()
    for draws, p in ((first, p0), (np.bincount(seconds, minlength=320), p1)):
        n = draws.sum()
        big = p * n >= 5
        observed = np.append(draws[big], draws[~big].sum())
        expected = np.append(p[big] * n, p[~big].sum() * n)
        keep = expected > 0
        chi2 = float((((observed - expected) ** 2)[keep] / expected[keep]).sum())
        dof = int(keep.sum()) - 1
        assert n >= 40 and chi2 < dof + 4 * np.sqrt(2 * dof) + 10, (chi2, dof, n)
    assert eagle.stats().draft_tokens > 0


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """A context-free target (a bigram model) and a head that is exact for it: every greedy
    draft is the target's own next token (`helpers.make_exact_eagle_head`)."""
    tmp = tmp_path_factory.mktemp("exact-eagle")
    hf_model, hf_dir = make_context_free_llama(tmp)
    mlc_dir = write_mlc_dir(hf_model, tmp / "mlc", "q0f32", hf_dir=hf_dir)
    head_hf = make_exact_eagle_head(tmp, hf_model)
    head_dir = convert(str(head_hf), "q0f32", tmp / "head-mlc", quiet=True)
    return mlc_dir, build_lib(mlc_dir), head_dir, build_lib(head_dir)


def test_an_exact_head_has_every_draft_accepted(exact):
    from mlc.serve.metrics import EngineCollector

    mlc_dir, lib, head_dir, head_lib = exact
    plain = MLCEngine(str(mlc_dir), "cpu", model_lib=str(lib))
    eng = MLCEngine(str(mlc_dir), "cpu", model_lib=str(lib), speculative_mode="eagle",
                    spec_draft_length=4, additional_models=[(str(head_dir), str(head_lib))],
                    enable_tracing=True)
    try:
        for p in (LONG_PROMPT[:60], "Hello"):
            assert ids(eng, p, max_tokens=33) == ids(plain, p, max_tokens=33)
        st = eng.stats()
        assert st.draft_tokens > 0 and st.acceptance_rate == 1.0
        assert st.decode_steps * 4 < st.decode_tokens       # up to 5 tokens per verify
        families = {f.name: f for f in EngineCollector(eng.metrics).collect()}
        assert families["mlc:spec_decode_draft_acceptance_rate"].samples[0].value == 1.0
        events = [e for e in eng.event_trace()["traceEvents"]
                  if e.get("name") == "verify" and e["ph"] == "i"]       # per request
        assert events and all(e["args"]["accepted"] == e["args"]["drafted"] for e in events)
    finally:
        eng.terminate()
        plain.terminate()


def test_partly_accepted_drafts_keep_seeded_sampling_exact(exact):
    """Sampling with the exact head: its greedy drafts are taken only when drawn, so steps
    accept some drafts and reject the rest (the head then resumes from the target's features
    of the accepted positions). Seeded outputs equal the plain engine's, token for token."""
    mlc_dir, lib, head_dir, head_lib = exact
    plain = MLCEngine(str(mlc_dir), "cpu", model_lib=str(lib))
    eng = MLCEngine(str(mlc_dir), "cpu", model_lib=str(lib), speculative_mode="eagle",
                    spec_draft_length=3, additional_models=[(str(head_dir), str(head_lib))])
    try:
        for seed in range(6):
            kw = dict(temperature=0.8, seed=seed, max_tokens=30)
            assert ids(eng, "Hello", **kw) == ids(plain, "Hello", **kw), seed
        st = eng.stats()
        assert 0.05 < st.acceptance_rate < 0.95, st.acceptance_rate
    finally:
        eng.terminate()
        plain.terminate()


# ------------------------------------------------------------------------------ bad input


def test_bad_heads_are_refused(tiny, tmp_path):
    hf_model, mlc_dir, lib, _, head_dir, head_lib = tiny
    # missing tensors: convert names them
    broken = make_tiny_eagle_head(tmp_path, hf_model, seed=3,
                                  drop=("fc.weight", "layers.0.mlp.up_proj.weight"))
    with pytest.raises(ConvertError, match="model_type=eagle") as e:
        convert(str(broken), "q0f32", tmp_path / "broken-mlc", quiet=True)
    assert "'fc.weight'" in e.value.message and "layers.0.mlp.up_proj.weight" in e.value.message
    # a head made for another hidden size
    other, _ = make_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    wrong = convert(str(make_tiny_eagle_head(tmp_path, other, seed=4)), "q0f32",
                    tmp_path / "wrong-mlc", quiet=True)
    with pytest.raises(ModelLoadError, match="hidden_size=32") as e:
        make_engine(tiny, head=f"{wrong}:{build_lib(wrong)}")
    assert e.value.param == "additional_models"
    # a plain model where the head belongs, and no head at all
    with pytest.raises(ModelLoadError, match="is a llama model"):
        make_engine(tiny, head=f"{mlc_dir}:{lib}")
    with pytest.raises(ModelLoadError, match="needs an EAGLE head"):
        make_engine(tiny, additional_models=[])


def test_a_target_library_without_hidden_states_asks_for_a_recompile(tiny, monkeypatch):
    from mlc.runtime.model import HIDDEN_STATE_FUNCTIONS

    has = LoadedModel._has
    monkeypatch.setattr(LoadedModel, "_has",
                        lambda self, name: name not in HIDDEN_STATE_FUNCTIONS and has(self, name))
    # (the head's library is not consulted: the target is refused before it loads)
    with pytest.raises(ModelLoadError, match="Recompile it with `mlc compile") as e:
        make_engine(tiny)
    assert e.value.param == "model_lib" and "get_logits" in e.value.message


# ------------------------------------------------------------------------------ memory plan


def test_the_memory_plan_budgets_for_the_draft(monkeypatch):
    import mlc.runtime.memory_plan as mp

    gib = 1 << 30
    monkeypatch.setattr(mp, "device_memory_bytes", lambda device: 10 * gib)
    meta = {"context_window_size": 1 << 20, "max_batch_size": 8, "prefill_chunk_size": 1024,
            "activation_bytes": gib // 2,
            "kv_cache": {"num_hidden_layers": 4, "num_key_value_heads": 2, "head_dim": 64,
                         "page_size": 16, "dtype": "float16"}}
    per_token = 2 * 4 * 2 * 64 * 2                                    # 2 KiB
    draft = DraftNeeds(weight_bytes=gib, kv_bytes_per_token=per_token // 2,
                       activation_bytes=gib // 4)
    plain = plan_memory(meta, 2 * gib, None, "server", None, None, None, 0.5)
    spec = plan_memory(meta, 2 * gib, None, "server", None, None, None, 0.5, draft)
    # 5 GiB budget - 2 GiB weights - 0.5 GiB activations = 2.5 GiB of KV for the target alone
    assert plain.max_total_sequence_length == int(2.5 * gib) // per_token
    # ... minus the draft's 1.25 GiB, shared by both caches at 3 KiB per token
    assert spec.max_total_sequence_length == int(1.25 * gib) // (per_token + per_token // 2)
    assert spec.used_bytes <= 5 * gib < spec.used_bytes + per_token + per_token // 2
    assert spec.draft_kv_bytes == spec.max_total_sequence_length * per_token // 2
    assert "draft KV cache" in spec.describe() and "draft" not in plain.describe()
    # room for fewer than 4 pages of tokens is an error naming the draft's share
    tight = DraftNeeds(weight_bytes=int(2.5 * gib) - 100_000, kv_bytes_per_token=per_token)
    with pytest.raises(ModelLoadError, match="draft weights"):
        plan_memory(meta, 2 * gib, None, "server", None, None, None, 0.5, tight)


def test_the_engine_plans_for_the_heads_weights_and_cache(eagle):
    plan = eagle.memory_plan
    head = eagle.draft_model
    assert plan.draft is not None
    assert plan.draft.weight_bytes == sum(p.numel() * 4 for p in head.params)
    assert head.kv_config.max_total_sequence_length == plan.max_total_sequence_length


# ------------------------------------------------------------------------------ command lines


def test_mlc_llm_chat_and_serve_run_with_an_eagle_head(tiny, plain, tmp_path):
    """MLC-LLM's flags end to end: `mlc_llm gen_config`/`convert_weight --model-type eagle`
    on a published-layout head, `mlc_llm chat` (through `mlc chat`) and `mlc_llm serve`
    (through `mlc serve`, a real server answering the OpenAI client) with a head given as
    MODEL,MODEL_LIB; the server's greedy text is the plain engine's."""
    import openai
    from click.testing import CliRunner

    import mlc_llm.cli as mlc_llm_cli
    from mlc_llm.serve import EngineConfig, PopenServer

    _, mlc_dir, lib, head_hf, head_dir, head_lib = tiny
    # MLC-LLM's two steps for a published head (its config.json says llama)
    out = tmp_path / "head-two-step"
    for verb, extra in (("gen_config", []), ("convert_weight", ["--source-format",
                                                                "huggingface-torch"])):
        result = CliRunner().invoke(mlc_llm_cli.cli, [verb, str(head_hf), "--model-type", "eagle",
                                                      "--quantization", "q0f32", "-o", str(out),
                                                      *extra])
        assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((out / "mlc-chat-config.json").read_text())["model_type"] == "eagle"
    assert (out / "tensor-cache.json").read_text() == (head_dir / "tensor-cache.json").read_text()
    spec = ["--speculative-mode", "eagle", "--additional-models", f"{head_dir},{head_lib}",
            "--overrides", "spec_draft_length=3"]
    result = CliRunner().invoke(mlc_llm_cli.cli, ["chat", str(mlc_dir), "--device", "cpu",
                                                  "--model-lib", str(lib), *spec],
                                input="Hello\n/stats\n/exit\n")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "--speculative-mode eagle" in result.output and "decode:" in result.output
    cfg = EngineConfig(speculative_mode="eagle", spec_draft_length=3,
                       additional_models=[f"{head_dir},{head_lib}"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with PopenServer(str(mlc_dir), "cpu", model_lib=str(lib), port=port, engine_config=cfg,
                     startup_timeout=300):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        got = client.completions.create(model=str(mlc_dir), prompt=REPEATING, max_tokens=30,
                                        temperature=0, extra_body={"ignore_eos": True})
    want = plain.completions.create(prompt=REPEATING, max_tokens=30, temperature=0,
                                    ignore_eos=True)
    assert got.choices[0].text == want.choices[0].text
