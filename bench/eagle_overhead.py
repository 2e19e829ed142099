"""What EAGLE drafting costs per step on top of plain decoding, with a random head of the
target's shape (1 layer, acceptance ~0: every step pays for drafting and gains nothing, the
worst case; a trained head's acceptance is what pays it back).

    python bench/eagle_overhead.py MLC_DIR LIB OUT_DIR [--tokens 64] [--k 4]

Writes the head (published layout, random) and its converted + compiled form under OUT_DIR,
then times greedy decoding at batch 1 with and without `speculative_mode="eagle"`; prints one
JSON line per mode (tok/s, acceptance rate).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mlc.compiler.compile import compile_model
from mlc.compiler.convert import convert
from mlc.runtime.engine import MLCEngine
from mlc.support.chat_config import ChatConfig
from mlc.support.tensor_cache import TensorCache


def write_head(mlc_dir: Path, out: Path) -> Path:
    """A random one-layer head for the target in `mlc_dir`, in EAGLE's published layout."""
    chat = ChatConfig.load(mlc_dir)
    c = chat.model_config
    h, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.02
    cache = TensorCache(mlc_dir)
    embed = "model.embed_tokens.weight"
    sd = {"embed_tokens.weight": (torch.from_numpy(cache.get(embed).astype("float32"))
                                  if embed in cache.records else rand(c["vocab_size"], h)),
          "fc.weight": rand(h, 2 * h), "fc.bias": rand(h),
          "layers.0.self_attn.q_proj.weight": rand(h, h),
          "layers.0.self_attn.k_proj.weight": rand(kv, h),
          "layers.0.self_attn.v_proj.weight": rand(kv, h),
          "layers.0.self_attn.o_proj.weight": rand(h, h),
          "layers.0.post_attention_layernorm.weight": torch.ones(h),
          "layers.0.mlp.gate_proj.weight": rand(inter, h),
          "layers.0.mlp.up_proj.weight": rand(inter, h),
          "layers.0.mlp.down_proj.weight": rand(h, inter)}
    head = out / "head-hf"
    head.mkdir(parents=True, exist_ok=True)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", bias=True,
               hidden_size=h, intermediate_size=inter,
               num_attention_heads=c["num_attention_heads"],
               num_key_value_heads=c["num_key_value_heads"], num_hidden_layers=1,
               vocab_size=c["vocab_size"], rms_norm_eps=c.get("rms_norm_eps", 1e-5),
               rope_theta=c.get("rope_theta", 10000.0),
               max_position_embeddings=chat.context_window_size)
    (head / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, head / "pytorch_model.bin")
    return head


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mlc_dir")
    ap.add_argument("lib")
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args()
    out = Path(args.out)
    quant = ChatConfig.load(args.mlc_dir).quantization
    head_dir = convert(str(write_head(Path(args.mlc_dir), out)), quant, out / "head",
                       overwrite=True, quiet=True)
    head_lib = compile_model(head_dir, "cpu", out / "head.so", quiet=True).path
    prompt = "Summarize: the quick brown fox jumps over the lazy dog, twice. " * 3
    for mode in ("disable", "eagle"):
        kw = dict(speculative_mode="eagle", spec_draft_length=args.k,
                  additional_models=[f"{head_dir}:{head_lib}"]) if mode == "eagle" else {}
        eng = MLCEngine(args.mlc_dir, "cpu", model_lib=args.lib, mode="interactive", **kw)
        eng.completions.create(prompt=prompt, max_tokens=4, temperature=0)      # warm up
        t0 = time.perf_counter()
        eng.completions.create(prompt=prompt, max_tokens=args.tokens, temperature=0,
                               ignore_eos=True)
        seconds = time.perf_counter() - t0
        st = eng.stats()
        print(json.dumps({"mode": mode, "k": args.k if mode == "eagle" else 0,
                          "tokens": args.tokens, "tok_s": round(args.tokens / seconds, 2),
                          "acceptance_rate": round(st.acceptance_rate, 3)}), flush=True)
        eng.terminate()


if __name__ == "__main__":
    main()
