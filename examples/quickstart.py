"""The README's quick start: stream a chat completion from the embedded SmolLM2 on the CPU."""

import sys

from mlc_llm import MLCEngine

model = sys.argv[1] if len(sys.argv) > 1 else "dist/smollm2-q4f32_1"
engine = MLCEngine(model, device="cpu")
for response in engine.chat.completions.create(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        model=model, stream=True, max_tokens=64, temperature=0):
    for choice in response.choices:
        print(choice.delta.content or "", end="", flush=True)
print()
engine.terminate()
