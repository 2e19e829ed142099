"""Prefix caching and n-gram speculation on a real model (default: the embedded SmolLM2).

    python bench/spec_prefix.py [--model SmolLM2-135M-Instruct] [--device cpu] [--out FILE]

- prefix caching: time to first token of turn 5 of a multi-turn chat (each turn's history
  resent, as OpenAI clients do), with prefix_cache_mode "radix" and "disable";
- speculation: greedy decode tok/s at batch 1 with speculative_mode "disable" and "ngram"
  on a text-rewriting prompt (the answer repeats spans of the prompt), and the acceptance rate.
Greedy outputs of the modes are checked to be equal.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from mlc.runtime.engine import MLCEngine

ARTICLE = (
    "The paged KV cache stores the keys and values of every sequence in fixed-size pages. "
    "A sequence that shares a prompt prefix with another can share its pages, and only the "
    "rest of its prompt has to be computed. Speculative decoding lets a cheap proposer guess "
    "several tokens, which the target model checks in one forward pass; the accepted tokens "
    "cost one step instead of several. ")
TURNS = ["Summarize the text above in one sentence.", "Now in two sentences.",
         "Repeat the first sentence of the text exactly.", "What does the KV cache store?",
         "Repeat the text above word for word."]


def ttft_turn5(engine) -> tuple[float, int]:
    history = [{"role": "system", "content": ARTICLE * 3}]
    for turn in TURNS:
        history.append({"role": "user", "content": turn})
        t0 = time.perf_counter()
        stream = engine.chat.completions.create(messages=history, temperature=0, max_tokens=24,
                                                stream=True,
                                                stream_options={"include_usage": True})
        first, text, cached = None, "", 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - t0
            for c in chunk.choices:
                text += c.delta.content or ""
            if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
                cached = chunk.usage.prompt_tokens_details.cached_tokens
        history.append({"role": "assistant", "content": text})
    return first, cached


def decode_rate(engine, max_tokens: int) -> tuple[float, list[int]]:
    msgs = [{"role": "user", "content": ARTICLE + "\nRepeat the text above word for word."}]
    ids = []
    t0 = time.perf_counter()
    for out in engine.generate(engine.encode_chat(msgs), temperature=0, max_tokens=max_tokens,
                               ignore_eos=True):
        for d in out.deltas:
            ids.extend(d.token_ids)
    return len(ids) / (time.perf_counter() - t0), ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = {"machine": platform.processor() or platform.machine(), "model": a.model,
           "device": a.device, "date": time.strftime("%Y-%m-%d")}
    for mode in ("disable", "radix"):
        eng = MLCEngine(a.model, a.device, prefix_cache_mode=mode)
        try:
            ttft, cached = ttft_turn5(eng)
            res[f"turn5_ttft_s_prefix_{mode}"] = round(ttft, 4)
            res[f"turn5_cached_tokens_prefix_{mode}"] = cached
        finally:
            eng.terminate()
    outputs = {}
    for mode in ("disable", "ngram"):
        eng = MLCEngine(a.model, a.device, speculative_mode=mode, prefix_cache_mode="disable")
        try:
            decode_rate(eng, 8)                                    # warm up
            rate, outputs[mode] = decode_rate(eng, a.tokens)
            res[f"tok_s_spec_{mode}"] = round(rate, 2)
            if mode == "ngram":
                st = eng.stats()
                res["ngram_acceptance_rate"] = round(st.acceptance_rate, 3)
                res["ngram_draft_tokens"] = st.draft_tokens
        finally:
            eng.terminate()
    res["ngram_output_equals_plain"] = outputs["ngram"] == outputs["disable"]
    print(json.dumps(res, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
