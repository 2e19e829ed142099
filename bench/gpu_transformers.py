"""The transformers fp16 baseline of `mlc bench`, one configuration per process so a slow
torch.compile cannot take the other figures with it.

    python bench/gpu_transformers.py --model-config llama-3-8b --batches 1 --compile --json out.json
"""

import argparse
import json
from dataclasses import asdict

from mlc.benchmark.transformers_bench import bench_transformers
from mlc.models.presets import get_preset

p = argparse.ArgumentParser()
p.add_argument("--model-config", default="llama-3-8b")
p.add_argument("--prompts", default="128,512,2048")
p.add_argument("--batches", default="1,8,32,64")
p.add_argument("--decode-tokens", type=int, default=256)
p.add_argument("--runs", type=int, default=5)
p.add_argument("--compile", action="store_true", help="static cache + torch.compile")
p.add_argument("--json", required=True)
a = p.parse_args()
ints = lambda s: tuple(int(x) for x in s.split(",") if x)
res = bench_transformers(get_preset(a.model_config), a.model_config, ints(a.prompts),
                         a.decode_tokens, ints(a.batches), a.runs, use_compile=a.compile)
res.engine = "transformers" + ("+compile" if a.compile else "")
json.dump(asdict(res), open(a.json, "w"), indent=1)
print(json.dumps(asdict(res)))
