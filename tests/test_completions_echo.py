"""Completions with `echo` and `logprobs`: the prompt's own token logprobs (null for the first
token, as OpenAI returns them), `text_offset` into the echoed text, `top_logprobs`, and
`max_tokens=0` (score the prompt, generate nothing): what lm-evaluation-harness's
loglikelihood tasks ask of a server. Checked against transformers' log-softmax on the same
weights (a tiny random Llama, q0f32, on the CPU), with the prompt prefilled in several chunks.
"""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch
from helpers import hf_logits, tiny_llama_library

from mlc.errors import BadRequestError
from mlc.serve.app import create_app
from mlc.serve.server import ServerThread

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("echo-tiny")
    return tiny_llama_library(tmp)


@pytest.fixture(scope="module")
def engine(tiny):
    from mlc import MLCEngine

    _, mlc_dir, lib = tiny
    with MLCEngine(str(mlc_dir), "cpu", model_lib=str(lib), max_batch_size=2,
                   max_total_sequence_length=256, prefill_chunk_size=8) as eng:
        yield eng


def reference(hf_model, ids: list[int]) -> np.ndarray:
    return torch.log_softmax(torch.tensor(hf_logits(hf_model, ids)), -1).numpy()


def prompt_ids(mlc_dir) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(mlc_dir / "tokenizer.json"))
    return tok.encode(PROMPT, add_special_tokens=False).ids


def test_prompt_logprobs_match_transformers(tiny, engine):
    hf_model, mlc_dir, _ = tiny
    ids = prompt_ids(mlc_dir)
    assert len(ids) > 16                          # three prefill chunks of 8
    r = engine.completions.create(prompt=PROMPT, echo=True, logprobs=3, max_tokens=0)
    [choice] = r.choices
    lp = choice.logprobs
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference(hf_model, ids)
    want = np.array([ref[i - 1, ids[i]] for i in range(1, len(ids))])
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=1e-4)
    for i in range(1, len(ids)):       # (tokens decoding to the same text share a key)
        top = np.sort(ref[i - 1])[::-1][:3]
        values = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert 1 <= len(values) <= 3 and values[0] == pytest.approx(top[0], abs=1e-4)
        assert all(np.isclose(top, v, atol=1e-4).any() for v in values)
    assert "".join(lp.tokens) == PROMPT
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]


def test_echo_with_generated_tokens_continues_the_offsets(tiny, engine):
    hf_model, mlc_dir, _ = tiny
    ids = prompt_ids(mlc_dir)
    r = engine.completions.create(prompt=ids, echo=True, logprobs=1, max_tokens=3,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 3 and r.usage.completion_tokens == 3
    assert lp.text_offset[len(ids)] == len(PROMPT)      # the first new token follows the prompt
    assert r.choices[0].text.startswith(PROMPT)
    ref = reference(hf_model, ids)
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)],
                               [ref[i - 1, ids[i]] for i in range(1, len(ids))], atol=1e-4)
    # the first generated token is the greedy one, with the logprob transformers gives it
    assert lp.token_logprobs[len(ids)] == pytest.approx(ref[-1].max(), abs=1e-4)


def test_max_tokens_zero_without_echo_and_generate_refuses_it(engine):
    r = engine.completions.create(prompt=PROMPT, max_tokens=0)
    assert r.choices[0].text == "" and r.usage.completion_tokens == 0
    with pytest.raises(BadRequestError) as err:
        list(engine.generate(PROMPT, max_tokens=0))
    assert err.value.param == "max_tokens"


def test_echo_logprobs_over_http(tiny):
    from mlc import AsyncMLCEngine

    hf_model, mlc_dir, lib = tiny
    eng = AsyncMLCEngine(str(mlc_dir), "cpu", model_lib=str(lib), max_batch_size=2,
                         max_total_sequence_length=256)
    try:
        with ServerThread(create_app(eng)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            r = client.completions.create(model=eng.model_id, prompt=PROMPT, echo=True,
                                          logprobs=1, max_tokens=0)
            lp = r.choices[0].logprobs
            assert r.choices[0].text == PROMPT and lp.token_logprobs[0] is None
            ids = prompt_ids(mlc_dir)
            ref = reference(hf_model, ids)
            assert lp.token_logprobs[-1] == pytest.approx(ref[-2, ids[-1]], abs=1e-4)
            chunks = list(client.completions.create(model=eng.model_id, prompt=PROMPT,
                                                    echo=True, logprobs=1, max_tokens=0,
                                                    stream=True))
            streamed = [c.choices[0] for c in chunks if c.choices]
            assert streamed[0].text == PROMPT
            assert streamed[0].logprobs.token_logprobs == lp.token_logprobs
    finally:
        eng.terminate()
