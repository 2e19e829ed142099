"""The engine on the embedded SmolLM2-135M-Instruct (CPU): MLC-LLM's seed examples run as
written through `mlc_llm`, and greedy output matches transformers token for token.

The CPU library is still slow, so every request here is short. transformers' reference
tokens are computed once and cached (keyed by the GGUF, the prompts and library versions).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from pathlib import Path

import pytest
from helpers import TEST_CACHE_DIR, build_lib

pytestmark = pytest.mark.slow

REFERENCE_PROMPTS = ["What is the capital of France?",
                     "Write a short poem about the sea.",
                     "Explain in one paragraph what a compiler does."]
REFERENCE_TOKENS = 32


def _with_library(src: Path, out: Path) -> str:
    """A model dir beside its compiled library (`lib-cpu.so`), as a user would have it after
    `mlc compile`: the files are links to the cached dir and the cached library."""
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).symlink_to(f.resolve())
    (out / "lib-cpu.so").symlink_to(build_lib(src).resolve())
    return str(out)


@pytest.fixture(scope="module")
def smollm2_q4(smollm2_q4f16_1, tmp_path_factory):
    return _with_library(smollm2_q4f16_1, tmp_path_factory.mktemp("smollm2") / "q4f16_1")


@pytest.fixture(autouse=True)
def jit_cache(monkeypatch):
    """Where a GPU machine ("auto" picks the GPU) keeps the library it compiles."""
    monkeypatch.setenv("MLC_CACHE_DIR", str(TEST_CACHE_DIR / "jit"))
    monkeypatch.delenv("MLC_JIT_POLICY", raising=False)


# ------------------------------------------------------------------------------ seed examples


def test_seed_example_sync_stream_and_non_stream(smollm2_q4, capsys):
    from mlc_llm import MLCEngine

    # Create engine
    model = smollm2_q4
    engine = MLCEngine(model)

    # Run chat completion in OpenAI API.
    for response in engine.chat.completions.create(
        messages=[{"role": "user", "content": "What is the meaning of life?"}],
        model=model,
        stream=True,
        max_tokens=8,
    ):
        for choice in response.choices:
            print(choice.delta.content, end="", flush=True)
    print("\n")

    response = engine.chat.completions.create(
        messages=[{"role": "user", "content": "What is the meaning of life?"}],
        model=model,
        stream=False,
        max_tokens=8,
        temperature=0,
    )
    print(response)
    engine.terminate()

    streamed = capsys.readouterr().out.split("\n\n")[0]
    assert streamed.strip() and "None" not in streamed
    if engine.model.device_kind == "cpu":
        assert engine.model.lib_path.name == "lib-cpu.so"  # found beside the weights
    choice = response.choices[0]
    assert choice.finish_reason in ("length", "stop") and response.usage.completion_tokens <= 8
    assert "life" in choice.message.content.lower(), choice.message.content


def test_seed_example_async_two_concurrent_prompts(smollm2_q4, capsys):
    from typing import Dict

    from mlc_llm.serve import AsyncMLCEngine

    model = smollm2_q4
    prompts = [
        "Write a three-day travel plan to Pittsburgh.",
        "What is the meaning of life?",
    ]

    async def test_completion():
        # Create engine
        async_engine = AsyncMLCEngine(model=model)

        num_requests = len(prompts)
        output_texts: Dict[str, str] = {}

        async def generate_task(prompt: str):
            async for response in await async_engine.chat.completions.create(
                messages=[{"role": "user", "content": prompt}],
                model=model,
                stream=True,
                max_tokens=6,
            ):
                if response.id not in output_texts:
                    output_texts[response.id] = ""
                output_texts[response.id] += response.choices[0].delta.content

        tasks = [asyncio.create_task(generate_task(prompts[i])) for i in range(num_requests)]
        await asyncio.gather(*tasks)

        # Print output.
        for request_id, output in output_texts.items():
            print(f"Output of request {request_id}:\n{output}\n")

        stats = async_engine.stats()
        async_engine.terminate()
        return output_texts, stats

    output_texts, stats = asyncio.run(test_completion())
    assert len(output_texts) == 2 and all(t.strip() for t in output_texts.values())
    assert "Output of request" in capsys.readouterr().out
    # the two requests shared decode steps
    assert stats.decode_steps < stats.decode_tokens


# ------------------------------------------------------------------------------ transformers


def _reference_key(gguf: Path) -> str:
    import torch
    import transformers

    h = hashlib.sha256()
    for part in (gguf.name, str(gguf.stat().st_size), transformers.__version__,
                 torch.__version__, json.dumps(REFERENCE_PROMPTS), str(REFERENCE_TOKENS)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _transformers_greedy(gguf: Path) -> list[dict]:
    """transformers' float32 greedy continuation of each chat prompt (generate with
    do_sample=False), cached: [{"prompt_ids", "ids", "tokens", "logprobs"}]."""
    path = TEST_CACHE_DIR / "reference" / f"smollm2-greedy-{_reference_key(gguf)}.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 torch_dtype=torch.float32).eval()
    out = []
    for prompt in REFERENCE_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            gen = model.generate(torch.tensor([prompt_ids]), do_sample=False,
                                 max_new_tokens=REFERENCE_TOKENS, return_dict_in_generate=True,
                                 output_logits=True, pad_token_id=tok.eos_token_id)
        ids = gen.sequences[0, len(prompt_ids):].tolist()
        logprobs = [float(torch.log_softmax(step[0].float(), -1)[i])
                    for step, i in zip(gen.logits, ids)]
        out.append({"prompt_ids": prompt_ids, "ids": ids, "logprobs": logprobs,
                    "tokens": [tok.decode([i]) for i in ids],
                    "text": tok.decode(ids, skip_special_tokens=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def test_greedy_matches_transformers(smollm2_q0f32, embedded_gguf):
    from mlc_llm import MLCEngine

    reference = _transformers_greedy(embedded_gguf)
    engine = MLCEngine(str(smollm2_q0f32), "cpu", model_lib=str(build_lib(smollm2_q0f32)))
    try:
        messages = [[{"role": "user", "content": p}] for p in REFERENCE_PROMPTS]
        for m, ref in zip(messages, reference):
            assert engine.encode_chat(m) == ref["prompt_ids"]          # same template, same tokenizer
        # All prompts at once: batched prefill and decode must not change a token.
        streams = [engine.chat.completions.create(
            messages=m, max_tokens=REFERENCE_TOKENS, temperature=0, logprobs=True,
            presence_penalty=0, frequency_penalty=0, repetition_penalty=1.0, stream=True)
            for m in messages]
        results = []
        for stream in streams:
            entries, text, reason = [], "", None
            for chunk in stream:
                for c in chunk.choices:
                    entries += c.logprobs.content if c.logprobs else []
                    text += c.delta.content or ""
                    reason = c.finish_reason or reason
            results.append((entries, text, reason))
    finally:
        engine.terminate()
    for (entries, text, reason), ref in zip(results, reference):
        assert [e.token for e in entries] == ref["tokens"]
        assert text == ref["text"]
        assert reason == ("stop" if len(ref["ids"]) < REFERENCE_TOKENS else "length")
        for e, lp in zip(entries, ref["logprobs"]):
            assert math.isclose(e.logprob, lp, abs_tol=2e-2), (e.token, e.logprob, lp)
