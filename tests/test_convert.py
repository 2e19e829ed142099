"""`mlc convert` on tiny random Llamas (safetensors, sharded, bf16, GGUF) and on bad inputs."""

from __future__ import annotations

import copy
import errno
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import CHATML_TEMPLATE, make_tiny_llama

from mlc.cli.main import cli
from mlc.compiler.convert import convert
from mlc.compiler.quantization import dequantize_weight, get_quantization, quantize_weight
from mlc.compiler.quantization import quantized_param_names as qnames
from mlc.errors import ConvertError
from mlc.models.registry import get_model
from mlc.support.chat_config import ChatConfig
from mlc.support.tensor_cache import TensorCache, TensorCacheWriter, load_tensor_cache

QUANTIZATIONS = ["q0f32", "q0f16", "q4f16_1", "q4f32_1"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, its safetensors dir, its state dict as float32 numpy)."""
    model, hf_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny"))
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return model, hf_dir, sd


def _mapping(hf_dir: Path):
    info = get_model("llama")
    return info.param_mapping(info.config_from_hf(json.loads((hf_dir / "config.json").read_text())))


def _expected(sd, pm) -> np.ndarray:
    arrays = [sd[n] for n in pm.source_names]
    return pm.combine(arrays) if pm.combine else arrays[0]


def _run(*args: str):
    result = CliRunner().invoke(cli, list(args))
    text = result.output + (getattr(result, "stderr", "") if result.stderr_bytes else "")
    return result.exit_code, text


def _assert_nothing_left(parent: Path, name: str = "out"):
    left = [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]
    assert left == [], left


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_convert_every_quantization(tiny, tmp_path, quantization):
    _, hf_dir, sd = tiny
    q = get_quantization(quantization)
    out = convert(str(hf_dir), quantization, tmp_path / "out", quiet=True)
    cache = TensorCache(out, verify=True)
    mapping = _mapping(hf_dir)
    for pm in mapping:
        ref = _expected(sd, pm)
        if pm.quantize and q.is_quantized:
            qw, qs = (cache.get(n) for n in qnames(pm.mlc_name))
            assert qw.dtype == np.uint32 and qs.dtype == np.dtype(q.model_dtype)
            exact = quantize_weight(ref.astype(q.model_dtype), q)
            np.testing.assert_array_equal(qw, exact[0])
            np.testing.assert_array_equal(qs, exact[1])
            deq = dequantize_weight(qw, qs, q, ref.shape[-1]).astype(np.float64)
            step = np.repeat(qs.astype(np.float64), 32, axis=-1)[:, : ref.shape[-1]]
            eps = np.finfo(q.model_dtype).eps
            assert np.all(np.abs(deq - ref) <= step * (0.5 + 8 * eps) + np.abs(ref) * 2 * eps)
        else:
            got = cache.get(pm.mlc_name)
            assert got.dtype == np.dtype(q.model_dtype), pm.mlc_name
            np.testing.assert_array_equal(got, ref.astype(q.model_dtype))  # exact / fp16 cast
    n_tensors = sum(2 if pm.quantize and q.is_quantized else 1 for pm in mapping)
    assert len(cache) == n_tensors and cache.metadata["ParamSize"] == n_tensors
    assert "lm_head.weight" in cache or "lm_head.q_weight" in cache    # untied model
    chat = ChatConfig.load(out)
    assert (chat.model_type, chat.quantization, chat.vocab_size) == ("llama", quantization, 320)
    assert chat.model_config["num_hidden_layers"] == 2 and chat.context_window_size == 256
    assert chat.eos_token_id == [2] and chat.eos_token == "<|im_end|>" and chat.pad_token_id == 0
    assert chat.chat_template == CHATML_TEMPLATE and chat.add_bos_token is False
    assert set(TOKENIZER_FILES) <= set(chat.tokenizer_files)
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sharded_and_bf16_sources(tiny, tmp_path):
    import torch

    model, hf_dir, sd = tiny
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    for name in TOKENIZER_FILES:
        shutil.copy(hf_dir / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a = load_tensor_cache(convert(str(hf_dir), "q4f16_1", tmp_path / "a", quiet=True))
    b = load_tensor_cache(convert(str(sharded), "q4f16_1", tmp_path / "b", quiet=True))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])

    bf16 = tmp_path / "bf16"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(bf16)
    c = load_tensor_cache(convert(str(bf16), "q0f32", tmp_path / "c", quiet=True))
    for pm in _mapping(hf_dir):
        ref = torch.from_numpy(_expected(sd, pm)).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(c[pm.mlc_name], ref)


def test_cli_success_overrides_and_overwrite(tiny, tmp_path):
    _, hf_dir, _ = tiny
    out = tmp_path / "out"
    code, text = _run("convert", str(hf_dir), "-q", "q4f16_1", "-o", str(out), "--quiet",
                      "--overrides", "context_window_size=128;prefill_chunk_size=64")
    assert code == 0, text
    assert "bits/param" in text and "tensors" in text
    chat = ChatConfig.load(out)
    assert chat.context_window_size == 128 and chat.prefill_chunk_size == 64
    before = (out / "tensor-cache.json").read_text()
    # existing OUTDIR: refused, untouched
    code, text = _run("convert", str(hf_dir), "-q", "q0f16", "-o", str(out), "--quiet")
    assert code == 2 and "already exists" in text and "--overwrite" in text
    assert (out / "tensor-cache.json").read_text() == before
    # --overwrite replaces it
    code, text = _run("convert", str(hf_dir), "-q", "q0f16", "-o", str(out), "--quiet",
                      "--overwrite")
    assert code == 0, text
    assert ChatConfig.load(out).quantization == "q0f16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _bad_dir(tiny, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny[1], src)
    return src


def test_missing_and_unknown_sources(tmp_path):
    for source in (str(tmp_path / "no-such-dir"), "not-a-model-name"):
        code, text = _run("convert", source, "-o", str(tmp_path / "out"))
        assert code == 2 and "not found" in text
        assert "HF://org/repo" in text and "SmolLM2-135M-Instruct" in text and ".gguf" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = _run("convert", str(empty), "-o", str(tmp_path / "out"))
    assert code == 2 and "config.json" in text
    _assert_nothing_left(tmp_path)


def test_unsupported_architecture_lists_supported(tiny, tmp_path):
    src = _bad_dir(tiny, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (src / "config.json").write_text(json.dumps(cfg))
    code, text = _run("convert", str(src), "-o", str(tmp_path / "out"))
    assert code == 2 and "gpt_neox" in text and "llama" in text and "mistral" in text
    _assert_nothing_left(tmp_path)


def test_unknown_quantization_lists_valid(tiny, tmp_path):
    code, text = _run("convert", str(tiny[1]), "-q", "q3f99", "-o", str(tmp_path / "out"))
    assert code == 2 and "q3f99" in text
    assert all(q in text for q in QUANTIZATIONS)
    _assert_nothing_left(tmp_path)


def test_bad_overrides(tiny, tmp_path):
    code, text = _run("convert", str(tiny[1]), "-o", str(tmp_path / "out"),
                      "--overrides", "no_such_field=1")
    assert code == 2 and "no_such_field" in text and "context_window_size" in text
    _assert_nothing_left(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tiny, tmp_path, damage):
    src = _bad_dir(tiny, tmp_path)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x13\x00garbage" * 100 if damage == "garbage" else data[:len(data) // 2])
    code, text = _run("convert", str(src), "-o", str(tmp_path / "out"))
    assert code == 2 and "Corrupt safetensors" in text and "model.safetensors" in text
    _assert_nothing_left(tmp_path)


def test_disk_full_midway_leaves_nothing(tiny, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_add = TensorCacheWriter.add

    def add(self, name, array, encode_format="raw"):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, name, array, encode_format)

    monkeypatch.setattr(TensorCacheWriter, "add", add)
    code, text = _run("convert", str(tiny[1]), "-o", str(tmp_path / "out"), "--quiet")
    assert code == 2 and "No space left" in text and calls["n"] == 5
    _assert_nothing_left(tmp_path)


def test_mlc_dir_as_source_is_refused(tiny, tmp_path):
    out = convert(str(tiny[1]), "q4f16_1", tmp_path / "mlc", quiet=True)
    code, text = _run("convert", str(out), "-o", str(tmp_path / "out"))
    assert code == 2 and "already in MLC format" in text
    _assert_nothing_left(tmp_path)


def test_hf_hub_sources(tiny, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    mlc_dir = convert(str(tiny[1]), "q0f32", tmp_path / "mlc", quiet=True)
    snapshots = {"org/tiny": tiny[1], "mlc-ai/tiny-MLC": mlc_dir}

    def fake_download(repo_id, **kwargs):
        if repo_id not in snapshots:
            raise LocalEntryNotFoundError("Name or service not known")
        return str(snapshots[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    out = convert("HF://org/tiny", "q4f16_1", tmp_path / "out", quiet=True)
    assert ChatConfig.load(out).source == "HF://org/tiny"
    with pytest.raises(ConvertError, match="already in MLC format"):
        convert("HF://mlc-ai/tiny-MLC", "q4f16_1", tmp_path / "x", quiet=True)
    with pytest.raises(ConvertError, match="local HF dir.*SmolLM2-135M-Instruct"):
        convert("HF://org/offline", "q4f16_1", tmp_path / "x", quiet=True)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------ GGUF


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_tiny_gguf(path: Path, sd: dict, hf_dir: Path) -> dict[str, np.ndarray]:
    """The tiny Llama as llama.cpp would write it (token_embd in Q8_0, the rest F32 and one
    F16); returns what a q0f32 conversion must give back for each HF name."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    specials = {t["id"] for t in tok["added_tokens"] if t["special"]}
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab] + [f"<extra_{i}>" for i in range(320 - len(vocab))])
    w.add_token_types([3 if i in specials else 1 for i in range(320)])
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHATML_TEMPLATE)
    expect = {}
    names = {v: k for k, v in get_model("llama").gguf_names(
        get_model("llama").config_from_hf(cfg)).items()}
    for hf_name, value in sd.items():
        base, suffix = hf_name.rsplit(".", 1)
        gname = f"{names[base]}.{suffix}"
        value = value.astype(np.float32)
        expect[hf_name] = value
        if hf_name.endswith("q_proj.weight"):
            value = _llama_cpp_permute(value, cfg["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            value = _llama_cpp_permute(value, cfg["num_key_value_heads"])
        if gname == "token_embd.weight":
            qt = gguf.GGMLQuantizationType.Q8_0
            data = gguf.quants.quantize(value, qt)
            expect[hf_name] = gguf.quants.dequantize(data, qt)
            w.add_tensor(gname, data, raw_dtype=qt)
        elif gname == "blk.0.ffn_down.weight":
            w.add_tensor(gname, value.astype(np.float16))
            expect[hf_name] = value.astype(np.float16).astype(np.float32)
        else:
            w.add_tensor(gname, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path, tiny[2], tiny[1])


def test_gguf_source(tiny, tiny_gguf, tmp_path):
    from tokenizers import Tokenizer

    path, expect = tiny_gguf
    out = convert(str(path), "q0f32", tmp_path / "out", quiet=True)
    cache = TensorCache(out)
    for pm in _mapping(tiny[1]):
        np.testing.assert_array_equal(cache.get(pm.mlc_name), _expected(expect, pm))
    chat = ChatConfig.load(out)
    assert chat.model_config["tie_word_embeddings"] is False
    assert chat.model_config["rms_norm_eps"] == 1e-5
    assert chat.eos_token_id == [2] and chat.pad_token_id == 0
    assert chat.chat_template == CHATML_TEMPLATE
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    ref = Tokenizer.from_file(str(tiny[1] / "tokenizer.json"))
    for text in ["The quick brown fox", "Hello, world!  12 ok\n\n x",
                 "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "héllo 😀"]:
        assert ours.encode(text).ids == ref.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad-magic"])
def test_corrupt_gguf(tiny_gguf, tmp_path, damage):
    data = tiny_gguf[0].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({"garbage": b"GGUF" + b"\xff" * 64, "truncated": data[: len(data) // 2],
                     "bad-magic": b"NOPE" + data[4:]}[damage])
    code, text = _run("convert", str(bad), "-q", "q0f32", "-o", str(tmp_path / "out"))
    assert code == 2 and "GGUF" in text and "bad.gguf" in text, text
    _assert_nothing_left(tmp_path)


def test_gguf_sentencepiece_tokenizer(tmp_path):
    """tokenizer.ggml.model == "llama" (SentencePiece BPE with scores and byte fallback)
    rebuilt as transformers rebuilds it from the same GGUF."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from mlc.compiler.sources.gguf_file import GGUFSource

    pieces = ["▁", "e", "l", "o", "H", "w", "r", "d", "t", "h", "a", "s", "i", "n", "ll", "▁H",
              "▁w", "or", "▁t", "he", "▁He", "llo", "▁wor", "▁the", "▁Hello", "▁world", "▁is",
              "in"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for add, value in [(w.add_block_count, 1), (w.add_context_length, 64),
                       (w.add_embedding_length, 32), (w.add_feed_forward_length, 64),
                       (w.add_head_count, 2), (w.add_head_count_kv, 2),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_tokenizer_model, "llama"),
                       (w.add_token_list, tokens), (w.add_bos_token_id, 1),
                       (w.add_eos_token_id, 2), (w.add_unk_token_id, 0),
                       (w.add_add_bos_token, True), (w.add_add_eos_token, False)]:
        add(value)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    with GGUFSource(tmp_path / "spm.gguf") as src:
        ours = Tokenizer.from_str(src.tokenizer_files["tokenizer.json"].decode())
        assert src.special_tokens.add_bos_token and src.special_tokens.bos_token == "<s>"
    for text in ["Hello world", "Hello the world is in", "  Hello  world ", "Hi é 😀\n",
                 "<s>Hello</s> world", "the<s>the", ""]:
        assert ours.encode(text).ids == ref.encode(text), text
    assert ours.decode(ours.encode("Hello é world").ids) == "Hello é world"
