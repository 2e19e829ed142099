"""Embeddings (`engine.embeddings.create`, `POST /v1/embeddings`): pooled final hidden states,
checked against transformers' float32 hidden states on the same weights (a tiny random Llama,
q0f32, on the CPU, with prompts longer than a prefill chunk; and SmolLM2 q0f32), batched and
alone, alongside generation, through the openai client, and every error a request can make.
"""

from __future__ import annotations

import base64
import threading

import numpy as np
import openai
import pytest
import torch
from helpers import build_lib, hf_greedy, make_tiny, tiny_llama_library, write_mlc_dir

from mlc.errors import BadRequestError, ContextWindowExceededError, ModelLoadError
from mlc.serve.app import create_app
from mlc.serve.server import ServerThread

CHUNK = 16          # the tiny engine's prefill chunk: longer inputs run in several chunks
CONTEXT = 256       # the tiny model's context window


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed-tiny")
    return tiny_llama_library(tmp)


def _engine_args(tiny):
    _, mlc_dir, lib = tiny
    return dict(model=str(mlc_dir), device="cpu", model_lib=str(lib), max_batch_size=4,
                max_total_sequence_length=512, prefill_chunk_size=CHUNK)


@pytest.fixture(scope="module")
def engine(tiny):
    from mlc import MLCEngine

    with MLCEngine(**_engine_args(tiny)) as eng:
        yield eng


def hf_hidden(hf_model, ids: list[int]) -> np.ndarray:
    """transformers' last hidden states (after the final norm) of one sequence [len, h]."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids]), output_hidden_states=True) \
            .hidden_states[-1][0].float().numpy()


def reference(hf_model, ids: list[int], pooling: str) -> np.ndarray:
    """The embedding computed from transformers: pooled in float64, L2-normalised."""
    h = hf_hidden(hf_model, ids).astype(np.float64)
    v = h[-1] if pooling == "last" else h.mean(axis=0)
    return v / np.linalg.norm(v)


def random_ids(rng, n: int, vocab: int = 300) -> list[int]:
    return rng.integers(3, vocab, n).tolist()    # no special tokens (ids 0-2)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float64)


def assert_close(ours: np.ndarray, ref: np.ndarray, atol: float = 1e-5) -> None:
    """Unit vectors: cosine similarity > 1 - 1e-7 (float32 rounding) and max |difference|
    <= atol."""
    assert np.linalg.norm(ours) == pytest.approx(1.0, abs=1e-6)
    assert float(ours @ ref) > 1 - 1e-7
    assert np.abs(ours - ref).max() <= atol


def test_last_hidden_state_of_transformers_is_after_the_final_norm(tiny):
    """The reference is the right one: hidden_states[-1] is the normed output lm_head reads."""
    hf_model, _, _ = tiny
    ids = random_ids(np.random.default_rng(1), 12)
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_hidden_states=True)
        last = hf_model.model(torch.tensor([ids])).last_hidden_state
        logits = hf_model.lm_head(out.hidden_states[-1])
    assert len(out.hidden_states) == 3              # the embeddings, layer 0, the normed end
    torch.testing.assert_close(out.hidden_states[-1], last)
    torch.testing.assert_close(logits, out.logits)
    rms = out.hidden_states[-1].pow(2).mean(-1).sqrt()
    assert not torch.allclose(rms, torch.ones_like(rms))  # (norm weights ~ N(1, 0.2))


def test_library_hidden_states_match_transformers(tiny):
    from helpers import load_model

    hf_model, mlc_dir, lib = tiny
    model = load_model(mlc_dir, lib, prefill_chunk_size=64)
    rng = np.random.default_rng(2)
    a, b = random_ids(rng, 29), random_ids(rng, 6)
    model.add_sequence(0)
    model.add_sequence(1)
    hidden = model.prefill_hidden_states([0, 1], [a, b])
    assert hidden.shape == (35, 64) and hidden.dtype == np.float32
    np.testing.assert_allclose(hidden[:29], hf_hidden(hf_model, a), atol=2e-5)
    np.testing.assert_allclose(hidden[29:], hf_hidden(hf_model, b), atol=2e-5)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi", "gemma3"])
def test_every_architecture_returns_transformers_hidden_states(tmp_path, arch):
    """The other architectures' libraries: every position's final hidden state (Gemma 3's
    sliding layers of window 8 included: 30 tokens, in chunks of 16)."""
    from mlc import MLCEngine

    hf_model, hf_dir = make_tiny(tmp_path, arch)
    mlc_dir = write_mlc_dir(hf_model, tmp_path / "mlc", "q0f32", hf_dir=hf_dir)
    ids = random_ids(np.random.default_rng(13), 30)
    with MLCEngine(str(mlc_dir), "cpu", model_lib=str(build_lib(mlc_dir)),
                   max_total_sequence_length=256, prefill_chunk_size=CHUNK) as eng:
        for pooling in ("last", "mean"):
            r = eng.embeddings.create(input=[ids, ids[:5]], extra_body={"pooling": pooling})
            for ours, tokens in zip(vectors(r), (ids, ids[:5])):
                assert_close(ours, reference(hf_model, tokens, pooling), atol=2e-5)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_embeddings_match_transformers(tiny, engine, pooling):
    hf_model, _, _ = tiny
    rng = np.random.default_rng(3)
    inputs = [random_ids(rng, n) for n in (1, 7, CHUNK + 9, 3 * CHUNK + 5)]  # 4 chunks at most
    r = engine.embeddings.create(input=inputs, extra_body={"pooling": pooling})
    assert r.object == "list" and r.model == engine.model_id
    assert [d.index for d in r.data] == [0, 1, 2, 3]
    assert all(d.object == "embedding" and len(d.embedding) == 64 for d in r.data)
    total = sum(map(len, inputs))
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (total, total)
    for ours, ids in zip(vectors(r), inputs):
        assert_close(ours, reference(hf_model, ids, pooling))


def test_poolings_differ_and_the_default_is_last(tiny, engine):
    ids = random_ids(np.random.default_rng(4), 20)
    default = vectors(engine.embeddings.create(input=ids))[0]
    last = vectors(engine.embeddings.create(input=ids, extra_body={"pooling": "last"}))[0]
    mean = vectors(engine.embeddings.create(input=ids, extra_body={"pooling": "mean"}))[0]
    np.testing.assert_array_equal(default, last)
    assert float(last @ mean) < 0.999


def test_text_inputs_are_tokenized_as_completions_are(tiny, engine):
    from tokenizers import Tokenizer

    hf_model, mlc_dir, _ = tiny
    tok = Tokenizer.from_file(str(mlc_dir / "tokenizer.json"))
    words = "fox dog quick lazy world hello model pages cache kernels numbers".split()
    rng = np.random.default_rng(5)
    texts = [" ".join(rng.choice(words, n)) for n in (3, 11, 25)]
    r = engine.embeddings.create(input=texts, model=engine.model_id, user="someone")
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    assert r.usage.prompt_tokens == sum(map(len, ids))
    for ours, i in zip(vectors(r), ids):
        assert_close(ours, reference(hf_model, i, "last"))
    one = engine.embeddings.create(input=texts[1])                   # a single string
    np.testing.assert_allclose(vectors(one)[0], vectors(r)[1], atol=1e-6)


def test_a_batch_equals_each_input_alone(engine):
    rng = np.random.default_rng(6)
    inputs = [random_ids(rng, int(n)) for n in rng.integers(1, 40, 9)]
    for pooling in ("last", "mean"):
        batch = vectors(engine.embeddings.create(input=inputs, extra_body={"pooling": pooling}))
        alone = np.concatenate([vectors(engine.embeddings.create(
            input=[ids], extra_body={"pooling": pooling})) for ids in inputs])
        np.testing.assert_allclose(batch, alone, atol=1e-6)


def test_dimensions_and_base64(engine):
    ids = random_ids(np.random.default_rng(7), 10)
    full = vectors(engine.embeddings.create(input=ids))[0]
    short = engine.embeddings.create(input=ids, dimensions=16)
    v = vectors(short)[0]
    assert v.shape == (16,)
    np.testing.assert_allclose(v, full[:16] / np.linalg.norm(full[:16]), atol=1e-6)
    b64 = engine.embeddings.create(input=[ids, ids[:4]], encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in b64.data]
    np.testing.assert_array_equal(decoded[0], full.astype(np.float32))
    assert decoded[1].shape == (64,)


@pytest.mark.parametrize("kwargs, param", [
    (dict(input=""), "input"),
    (dict(input=[]), "input"),
    (dict(input=["a", ""]), "input[1]"),
    (dict(input=[[1, 2], []]), "input[1]"),
    (dict(input=["a", [1, 2]]), "input"),
    (dict(input=[1, -2]), "input"),
    (dict(input=[1, 2], encoding_format="hex"), "encoding_format"),
    (dict(input=[1, 2], dimensions=0), "dimensions"),
    (dict(input=[1, 2], extra_body={"pooling": "max"}), "pooling"),
    (dict(input=[[1, 2], [5, 320]]), "input[1]"),            # beyond the vocabulary
])
def test_bad_requests(engine, kwargs, param):
    with pytest.raises(BadRequestError) as err:
        engine.embeddings.create(**kwargs)
    assert err.value.param == param, err.value.message


def test_context_window_and_model_errors(engine):
    with pytest.raises(ContextWindowExceededError) as err:
        engine.embeddings.create(input=[[5] * 3, [5] * (CONTEXT + 1)])
    assert err.value.code == "context_length_exceeded" and err.value.param == "input[1]"
    assert f"maximum context length is {CONTEXT} tokens" in err.value.message
    r = engine.embeddings.create(input=[5] * CONTEXT)                  # exactly fits
    assert r.usage.prompt_tokens == CONTEXT
    with pytest.raises(BadRequestError) as err:
        engine.embeddings.create(input="hi", model="other-model")
    assert err.value.code == "model_not_found"
    from mlc import MLCEngine

    with pytest.raises(ModelLoadError, match="embedding_pooling"):
        MLCEngine("unused", "cpu", embedding_pooling="max")


def test_engine_pooling_option(tiny):
    from mlc import MLCEngine

    hf_model, _, _ = tiny
    ids = random_ids(np.random.default_rng(8), 13)
    with MLCEngine(**_engine_args(tiny), embedding_pooling="mean",
                   prefix_cache_mode="disable") as eng:
        assert_close(vectors(eng.embeddings.create(input=ids))[0],
                     reference(hf_model, ids, "mean"))
        last = eng.embeddings.create(input=[ids] * 5, extra_body={"pooling": "last"})
        assert_close(vectors(last)[4], reference(hf_model, ids, "last"))
        eng.completions.create(prompt=[5, 6], max_tokens=1)      # (a step updates the stats)
        st = eng.stats()
        assert st.kv_pages_free == st.kv_pages_total         # the temporary sequences left


def test_embeddings_alongside_generation(tiny, slow_decode):
    """Embeddings between decode steps of running requests change neither: the generated
    tokens equal transformers' greedy ones, the vectors equal transformers' pooled ones."""
    from mlc import MLCEngine

    hf_model, _, _ = tiny
    rng = np.random.default_rng(9)
    prompts = [random_ids(rng, n) for n in (9, 21)]
    inputs = [random_ids(rng, int(n)) for n in rng.integers(2, 50, 6)]
    with MLCEngine(**_engine_args(tiny)) as eng:
        slow_decode(eng, 0.02)
        results: dict[int, list[int]] = {}

        def generate(i: int) -> None:
            r = eng.completions.create(prompt=prompts[i], max_tokens=24, temperature=0,
                                       ignore_eos=True)
            results[i] = r.choices[0].text

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        got = [vectors(eng.embeddings.create(input=inputs, extra_body={"pooling": p}))
               for p in ("mean", "last", "mean")]
        for t in threads:
            t.join()
        assert eng.stats().running_requests == 0
        for i, prompt in enumerate(prompts):
            want = eng.tokenizer.decode(hf_greedy(hf_model, prompt, 24))
            assert results[i] == want
        for v, p in zip(got, ("mean", "last", "mean")):
            for ours, ids in zip(v, inputs):
                assert_close(ours, reference(hf_model, ids, p))


def test_a_failing_step_fails_only_its_request(tiny, engine, monkeypatch):
    from mlc.errors import MLCError

    hf_model, _, _ = tiny
    real = engine.model.prefill_hidden_states
    calls = []

    def broken_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device fault")
        return real(*args)

    monkeypatch.setattr(engine.model, "prefill_hidden_states", broken_once)
    with pytest.raises(MLCError, match="device fault"):
        engine.embeddings.create(input=[5, 6, 7])
    ids = random_ids(np.random.default_rng(14), 11)
    assert_close(vectors(engine.embeddings.create(input=ids))[0],
                 reference(hf_model, ids, "last"))
    assert engine.completions.create(prompt=ids, max_tokens=2).usage.completion_tokens == 2


def test_a_full_kv_cache_input_and_waiting_for_pages(tiny, slow_decode):
    """A KV cache of 64 tokens (4 pages; the context window shrinks to it): an input of 64
    tokens takes the whole cache; one that needs pages a running request holds waits for
    them, then matches transformers."""
    from mlc import MLCEngine

    hf_model, _, _ = tiny
    args = {**_engine_args(tiny), "max_total_sequence_length": 64, "max_batch_size": 2}
    with MLCEngine(**args, prefix_cache_mode="disable") as eng:
        assert eng.limits.context_window_size == 64
        full = random_ids(np.random.default_rng(15), 64)
        assert_close(vectors(eng.embeddings.create(input=full, extra_body={
            "pooling": "mean"}))[0], reference(hf_model, full, "mean"))
        assert eng.stats().kv_pages_total == 5          # (TVM adds a page of its own)
        stream = eng.completions.create(prompt=full[:33], max_tokens=10, ignore_eos=True,
                                        stream=True)
        slow_decode(eng, 0.05)
        next(iter(stream))                  # generating: it holds 3 pages
        assert eng.stats().running_requests == 1
        ids = full[16:64]
        r = eng.embeddings.create(input=ids)   # needs 3 pages, 2 are free: waits for them
        assert eng.stats().running_requests == 0       # so the generation ended first
        assert "".join(c.choices[0].text for c in stream)
        assert_close(vectors(r)[0], reference(hf_model, ids, "last"))


def test_async_engine_and_cancellation(tiny):
    import asyncio

    from mlc import AsyncMLCEngine

    hf_model, _, _ = tiny
    rng = np.random.default_rng(10)
    inputs = [random_ids(rng, n) for n in (5, 30, 17)]

    async def main(eng):
        many = await asyncio.gather(*[eng.embeddings.create(input=[ids]) for ids in inputs])
        cancelled = asyncio.ensure_future(eng.embeddings.create(input=inputs * 20))
        await asyncio.sleep(0)
        cancelled.cancel()
        after = await eng.embeddings.create(input=inputs[0], extra_body={"pooling": "mean"})
        return many, after

    eng = AsyncMLCEngine(**_engine_args(tiny))
    try:
        many, after = asyncio.run(main(eng))
    finally:
        eng.terminate()
    for r, ids in zip(many, inputs):
        assert_close(vectors(r)[0], reference(hf_model, ids, "last"))
    assert_close(vectors(after)[0], reference(hf_model, inputs[0], "mean"))
    with pytest.raises(Exception, match="terminated"):
        asyncio.run(eng.embeddings.create(input="x"))


def test_library_without_hidden_states_asks_for_a_rebuild(tiny, tmp_path, monkeypatch):
    """A library built before `batch_prefill_hidden_states` (made here by leaving it out of
    the spec) still generates, and embeddings answer with the command that rebuilds it."""
    from mlc import MLCEngine
    from mlc.compiler.compile import compile_model
    from mlc.models.common import CausalLMBase

    _, mlc_dir, _ = tiny
    spec = CausalLMBase.get_default_spec

    def old_spec(self, target_kind):
        out = spec(self, target_kind)
        del out["batch_prefill_hidden_states"]
        return out

    monkeypatch.setattr(CausalLMBase, "get_default_spec", old_spec)
    old = tmp_path / "old.so"
    compile_model(mlc_dir, "cpu", old, quiet=True)
    monkeypatch.undo()
    with MLCEngine(str(mlc_dir), "cpu", model_lib=str(old), max_total_sequence_length=256) as eng:
        assert eng.completions.create(prompt=[5, 6, 7], max_tokens=2).usage.completion_tokens
        with pytest.raises(ModelLoadError) as err:
            eng.embeddings.create(input="hello")
    assert "mlc compile" in err.value.message and str(old) in err.value.message
    assert err.value.param == "model_lib"


# ---------------------------------------------------------------------------------------------
# Over HTTP, with the openai client


@pytest.fixture(scope="module")
def server(tiny):
    from mlc import AsyncMLCEngine

    eng = AsyncMLCEngine(**_engine_args(tiny))
    try:
        with ServerThread(create_app(eng)) as srv:
            yield srv, eng
    finally:
        eng.terminate()


def test_openai_client_float_and_base64(tiny, server):
    hf_model, _, _ = tiny
    srv, eng = server
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    rng = np.random.default_rng(11)
    inputs = [random_ids(rng, n) for n in (4, 33)]
    as_float = client.embeddings.create(model=eng.model_id, input=inputs,
                                        encoding_format="float")
    by_default = client.embeddings.create(model=eng.model_id, input=inputs)   # base64 (numpy)
    as_b64 = client.embeddings.with_raw_response.create(
        model=eng.model_id, input=inputs, encoding_format="base64").http_response.json()
    assert isinstance(as_b64["data"][0]["embedding"], str)
    assert as_float.object == "list" and as_float.usage.prompt_tokens == 37
    for i, ids in enumerate(inputs):
        ref = reference(hf_model, ids, "last")
        assert_close(np.array(as_float.data[i].embedding), ref)
        np.testing.assert_array_equal(np.array(by_default.data[i].embedding, np.float32),
                                      np.array(as_float.data[i].embedding, np.float32))
        decoded = np.frombuffer(base64.b64decode(as_b64["data"][i]["embedding"]), "<f4")
        np.testing.assert_array_equal(decoded, np.array(as_float.data[i].embedding, np.float32))
    mean = client.embeddings.create(model=eng.model_id, input="hello world", dimensions=8,
                                    extra_body={"pooling": "mean"})
    assert len(mean.data[0].embedding) == 8


def test_http_errors_have_openai_shape(server):
    srv, eng = server
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=eng.model_id, input="")
    assert err.value.status_code == 400 and err.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=eng.model_id, input=[7] * (CONTEXT + 5))
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (q0f32: the GGUF's weights exactly as transformers reads them)


@pytest.mark.slow
def test_smollm2_embeddings_match_transformers(smollm2_q0f32, embedded_gguf):
    from transformers import AutoModelForCausalLM

    from mlc import MLCEngine

    hf = AutoModelForCausalLM.from_pretrained(embedded_gguf.parent, gguf_file=embedded_gguf.name,
                                              dtype=torch.float32).eval()
    assert hf.model.embed_tokens.weight.dtype == torch.float32
    words = ("the a model of paris cat runs quickly blue sky river book seven learning "
             "compilers tokens light over under window").split()
    rng = np.random.default_rng(12)
    texts = [" ".join(rng.choice(words, n)).capitalize() + "." for n in (4, 19, 60)]
    with MLCEngine(str(smollm2_q0f32), "cpu", model_lib=str(build_lib(smollm2_q0f32)),
                   max_batch_size=4, max_total_sequence_length=1024,
                   prefill_chunk_size=32) as eng:
        ids = [eng.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        for pooling in ("last", "mean"):
            r = eng.embeddings.create(input=texts, extra_body={"pooling": pooling})
            assert len(r.data[0].embedding) == 576
            for ours, i in zip(vectors(r), ids):
                # 30 layers in float32, other summation orders: measured max |diff| 5.4e-7
                assert_close(ours, reference(hf, i, pooling), atol=1e-5)
