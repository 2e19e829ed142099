"""lm-evaluation-harness against `mlc serve`: its `local-completions` model runs the tiny
multiple-choice task shipped in tests/data/lm_eval (loglikelihood of each choice, through
`/v1/completions` with echo + logprobs) on SmolLM2-135M q0f32, offline, and every
loglikelihood it got equals transformers' float32 one on the same weights (the GGUF as
transformers reads it).

Needs the `eval` extra (`pip install -e '.[eval]'`); skipped without it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, build_lib

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: "
                    "pip install -e '.[eval]'")
pytestmark = pytest.mark.slow

TASK_DIR = REPO / "tests" / "data" / "lm_eval"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_lm_eval(base_url: str, model: str, tokenizer_args: str, out_dir) -> str:
    """The command README documents, offline (no hub, no dataset download); its log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out_dir / "datasets")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
           "--model_args", f"base_url={base_url}/completions,model={model}{tokenizer_args}",
           "--tasks", "mlc_mini_mc", "--include_path", "tests/data/lm_eval",
           "--output_path", str(out_dir), "--log_samples"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def read_outputs(out_dir) -> tuple[dict, list[dict]]:
    [results] = out_dir.rglob("results_*.json")
    [samples] = out_dir.rglob("samples_mlc_mini_mc_*.jsonl")
    return (json.loads(results.read_text())["results"]["mlc_mini_mc"],
            [json.loads(line) for line in samples.read_text().splitlines()])


def reference_loglikelihood(hf, tok, context: str, continuation: str) -> tuple[float, bool]:
    """transformers' (sum of logprobs of the continuation, whether it is the greedy one),
    with the continuation tokenized as lm_eval does: the tokens of context + continuation
    after those of the context."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    n_ctx = len(tok(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].float(), -1).numpy()
    rows = lp[n_ctx - 1:len(whole) - 1]
    targets = whole[n_ctx:]
    return (float(sum(r[t] for r, t in zip(rows, targets))),
            all(int(r.argmax()) == t for r, t in zip(rows, targets)))


@pytest.mark.parametrize("tokenizer", ["server", "local"])
def test_local_completions_loglikelihoods_equal_transformers(smollm2_q0f32, embedded_gguf,
                                                             tmp_path, tokenizer):
    """tokenizer "server": lm_eval finds the server's /tokenize routes by itself (no local
    tokenizer); "local": it reads tokenizer.json from the model dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlc_llm.serve import EngineConfig, PopenServer

    server = PopenServer(str(smollm2_q0f32), "cpu", model_lib=str(build_lib(smollm2_q0f32)),
                         port=free_port(), enable_debug=False,
                         engine_config=EngineConfig(max_batch_size=2,
                                                    max_total_sequence_length=1024))
    args = "" if tokenizer == "server" else \
        f",tokenizer_backend=huggingface,tokenizer={smollm2_q0f32}"
    with server:
        log = run_lm_eval(server.openai_v1_base_url, smollm2_q0f32.name, args, tmp_path)
    assert ("Using remote tokenizer" in log) == (tokenizer == "server"), log[-3000:]
    results, samples = read_outputs(tmp_path)
    docs = [json.loads(line) for line in
            (TASK_DIR / "mlc_mini_mc.jsonl").read_text().splitlines()]
    assert len(samples) == len(docs) == 10

    hf = AutoModelForCausalLM.from_pretrained(embedded_gguf.parent, gguf_file=embedded_gguf.name,
                                              dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_q0f32)
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        args = [sample["arguments"][f"gen_args_{i}"] for i in range(len(doc["choices"]))]
        assert [a["arg_1"] for a in args] == [" " + c for c in doc["choices"]]
        got = [(float(ll), greedy == "True") for ll, greedy in sample["filtered_resps"]]
        want = [reference_loglikelihood(hf, tok, a["arg_0"], a["arg_1"]) for a in args]
        # (measured: 1.6e-5 at most over the 40 choices)
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=2e-4)
        assert [g[1] for g in got] == [w[1] for w in want]
        right = int(np.argmax([w[0] for w in want])) == doc["answer"]
        assert sample["acc"] == float(right)
        correct += right
    assert results["acc,none"] == pytest.approx(correct / len(docs))
    assert results["acc,none"] >= 0.5           # SmolLM2 knows most of these (chance: 0.25)
