"""The transformers baseline of `mlc bench`: the same architecture, random fp16 weights, on the
same GPU, measured the same way (median of several runs). Needs torch and transformers."""

from __future__ import annotations

import statistics
import time

from mlc.benchmark.model_bench import BenchResult


def bench_transformers(hf_config: dict, name: str, prompt_lengths=(128, 512, 2048),
                       decode_tokens: int = 256, batches=(1, 8, 32, 64), runs: int = 5,
                       use_compile: bool = True, decode_context: int = 16) -> BenchResult:
    """Prefill and decode throughput of transformers fp16 (static cache + torch.compile for
    decode when `use_compile`, as a user tuning it would)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = dict(hf_config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16).eval()
    res = BenchResult(name, "fp16", "cuda", engine="transformers", runs=runs,
                      load_seconds=time.perf_counter() - t0, decode_context=decode_context)
    vocab = config.vocab_size

    def timed(fn) -> float:
        times = []
        for _ in range(runs):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    with torch.inference_mode():
        for n in prompt_lengths:
            ids = torch.randint(0, vocab, (1, n), device="cuda")
            model(ids, logits_to_keep=1)
            t = timed(lambda: model(ids, logits_to_keep=1))
            res.prefill_tok_s[n], res.ttft_ms[n] = n / t, t * 1000
        for b in batches:
            steps = decode_tokens if b == 1 else max(16, decode_tokens // 4)
            # (its decode time includes the prompt's prefill: small beside `steps` steps)
            prompt = torch.randint(0, vocab, (b, decode_context), device="cuda")
            kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            if use_compile:
                kwargs.update(cache_implementation="static",
                              compile_config=None)
            try:
                model.generate(prompt, **kwargs)          # warm up (and compile)
            except Exception:                              # noqa: BLE001 - fall back to eager
                kwargs.pop("cache_implementation", None)
                kwargs.pop("compile_config", None)
                model.generate(prompt, **kwargs)
            t = timed(lambda: model.generate(prompt, **kwargs))
            res.decode_tok_s[b] = b * steps / t
            res.decode_step_ms[b] = t / steps * 1000
        res.peak_memory_gib = torch.cuda.max_memory_allocated() / (1 << 30)
    return res
