"""vLLM's tokenizer routes on `mlc serve` (`/tokenize`, `/detokenize`, `/tokenizer_info`), which
lm-evaluation-harness's remote tokenizer uses: the ids are those `/v1/completions` scores, the
text round-trips, and bad requests are OpenAI-shaped 400/404s."""

from __future__ import annotations

import httpx
import pytest
from helpers import build_lib, make_tiny_llama, write_mlc_dir

from mlc.serve.app import create_app
from mlc.serve.server import ServerThread


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from mlc import AsyncMLCEngine

    tmp = tmp_path_factory.mktemp("tokenize-tiny")
    hf_model, hf_dir = make_tiny_llama(tmp)
    mlc_dir = write_mlc_dir(hf_model, tmp / "mlc", "q0f32", hf_dir=hf_dir)
    eng = AsyncMLCEngine(str(mlc_dir), "cpu", model_lib=str(build_lib(mlc_dir)),
                         max_batch_size=2, max_total_sequence_length=256)
    try:
        with ServerThread(create_app(eng, api_key="k")) as srv:
            yield srv, eng
    finally:
        eng.terminate()


def client(srv) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer k"}, timeout=60)


def test_tokenize_matches_completions_and_round_trips(server):
    from tokenizers import Tokenizer

    srv, eng = server
    text = "Hello, world! The quick brown fox jumps over the lazy dog."
    with client(srv) as c:
        r = c.post("/tokenize", json={"model": eng.model_id, "prompt": text,
                                      "add_special_tokens": False, "return_token_strs": True})
        assert r.status_code == 200
        body = r.json()
        tok = Tokenizer.from_file(str(eng.model_dir / "tokenizer.json"))
        assert body["tokens"] == tok.encode(text, add_special_tokens=False).ids
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
        assert "".join(body["token_strs"]) == text
        back = c.post("/detokenize", json={"tokens": body["tokens"]}).json()
        assert back == {"prompt": text}
        comp = c.post("/v1/completions", json={"prompt": text, "max_tokens": 0}).json()
        assert comp["usage"]["prompt_tokens"] == body["count"]
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert chat.json()["tokens"] == eng.encode_chat([{"role": "user", "content": "Hi"}])
        info = c.get("/tokenizer_info").json()
        assert info["eos_token"] == "<|im_end|>" and "<|im_start|>" in info["chat_template"]
        assert info["vocab_size"] == 320


def test_tokenizer_route_errors(server):
    srv, eng = server
    with client(srv) as c:
        for body, param in [({"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
                             "prompt"), ({}, "prompt"), ({"tokens": [1, 320]}, "tokens"),
                            ({"tokens": "abc"}, "tokens")]:
            route = "/detokenize" if "tokens" in body else "/tokenize"
            r = c.post(route, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        r = c.post("/tokenize", json={"model": "other", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert httpx.get(srv.url + "/tokenizer_info").status_code == 401     # the API key
