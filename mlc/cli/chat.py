"""`mlc chat MODEL`: an interactive terminal chat with streamed answers.

Commands: /help, /reset (forget the conversation), /stats (speed of the last answer),
/exit. Ctrl-C during an answer stops it (the request is aborted) and returns to the prompt;
Ctrl-C or Ctrl-D at the prompt leaves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import click

from mlc.errors import MLCError

PROMPT = ">>> "
COMMANDS = {
    "/help": "show this help",
    "/reset": "forget the conversation (keeps the system prompt)",
    "/stats": "prefill and decode speed of the last answer",
    "/exit": "leave (also /quit, Ctrl-D, or Ctrl-C at the prompt)",
}
HELP = {
    "model": "An MLC model dir, HF://org/repo, or an embedded model (SmolLM2-135M-Instruct, "
             "gemma3-270m).",
    "device": 'Device: "auto", "cpu", "cuda", "cuda:1", ...',
    "model_lib": "The compiled model library (.so); compiled on demand and cached if omitted.",
    "system": "A system prompt starting the conversation.",
    "temperature": "Sampling temperature (default: the model's).",
    "top_p": "Nucleus sampling probability mass (default: the model's).",
    "max_tokens": "Most tokens per answer (default: up to the context window).",
    "speculative_mode": "Speculative decoding: disable, ngram (prompt lookup), small_draft (a "
                        "draft model) or eagle (an EAGLE head); the last two need "
                        "--additional-models.",
    "spec_draft_length": "Most draft tokens verified per step (default 4).",
    "additional_models": "The draft model (small_draft) or EAGLE head (eagle): MODEL or "
                         "MODEL:LIB.",
}


@dataclass
class AnswerStats:
    """Token counts and timings of one answer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float = 0.0      # request sent -> first text
    total_s: float = 0.0            # request sent -> last chunk
    prefill_s: float = 0.0          # engine time in prefill (0 when unknown)
    decode_s: float = 0.0           # engine time in decode (0 when unknown)

    def describe(self) -> str:
        prefill_s = self.prefill_s or self.first_token_s
        decode_s = self.decode_s or max(self.total_s - self.first_token_s, 0.0)
        decoded = max(self.completion_tokens - (0 if self.decode_s else 1), 0)
        return (f"prefill: {_rate(self.prompt_tokens, prefill_s)} tok/s "
                f"({self.prompt_tokens} tokens, {prefill_s:.2f} s), "
                f"decode: {_rate(decoded, decode_s)} tok/s "
                f"({self.completion_tokens} tokens, {decode_s:.2f} s), "
                f"first token after {self.first_token_s:.2f} s")


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.1f}" if seconds > 0 else "n/a"


class ChatSession:
    """The read-answer loop over an `MLCEngine`."""

    def __init__(self, engine: Any, system: str | None = None, **sampling: Any):
        self.engine = engine
        self.system = system
        self.sampling = {k: v for k, v in sampling.items() if v is not None}
        self.history: list[dict[str, str]] = []
        self.last: AnswerStats | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def run(self) -> None:
        """Read lines until /exit, Ctrl-D or Ctrl-C at the prompt."""
        print("Type /help for commands; Ctrl-C stops an answer.", flush=True)
        while True:
            try:
                line = input(PROMPT).strip()
            except (EOFError, KeyboardInterrupt):
                print(flush=True)
                return
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.answer(line)

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name = line.split()[0].lower()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.reset()
            print("(conversation cleared)", flush=True)
        elif name == "/stats":
            print(self.last.describe() if self.last else "(no answer yet)", flush=True)
        elif name == "/help":
            for cmd, text in COMMANDS.items():
                print(f"  {cmd:<8} {text}")
            print("  Ctrl-C   stop the answer being written", flush=True)
        else:
            print(f"Unknown command {name}; type /help.", flush=True)
        return True

    def answer(self, text: str) -> None:
        """Stream the answer to `text`; on Ctrl-C abort it and forget the question."""
        messages = self.history + [{"role": "user", "content": text}]
        stats = AnswerStats()
        before = self.engine.stats()
        start = time.perf_counter()
        parts: list[str] = []
        try:
            stream = self.engine.chat.completions.create(
                messages=messages, stream=True, stream_options={"include_usage": True},
                **self.sampling)
        except MLCError as e:
            print(f"error: {e.message}", flush=True)
            return
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    stats.prompt_tokens = chunk.usage.prompt_tokens
                    stats.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        if not parts:
                            stats.first_token_s = time.perf_counter() - start
                        parts.append(choice.delta.content)
                        print(choice.delta.content, end="", flush=True)
        except KeyboardInterrupt:
            stream.close()          # the stream's cleanup aborts the request
            print("\n(answer stopped)", flush=True)
            return
        except MLCError as e:
            print(f"\nerror: {e.message}", flush=True)
            return
        print(flush=True)
        stats.total_s = time.perf_counter() - start
        after = self.engine.stats()
        stats.prefill_s = after.prefill_seconds - before.prefill_seconds
        stats.decode_s = after.decode_seconds - before.decode_seconds
        self.last = stats
        self.history = messages + [{"role": "assistant", "content": "".join(parts)}]


@click.command("chat")
@click.argument("model")
@click.option("--device", default="auto", show_default=True, help=HELP["device"])
@click.option("--model-lib", default=None, help=HELP["model_lib"])
@click.option("--system", default=None, help=HELP["system"])
@click.option("--temperature", type=float, default=None, help=HELP["temperature"])
@click.option("--top-p", type=float, default=None, help=HELP["top_p"])
@click.option("--max-tokens", type=int, default=None, help=HELP["max_tokens"])
@click.option("--speculative-mode", default="disable", show_default=True,
              type=click.Choice(["disable", "ngram", "small_draft", "eagle"]),
              help=HELP["speculative_mode"])
@click.option("--spec-draft-length", type=int, default=None, help=HELP["spec_draft_length"])
@click.option("--additional-models", multiple=True, help=HELP["additional_models"])
def chat(model: str, device: str, model_lib: str | None, system: str | None,
         temperature: float | None, top_p: float | None, max_tokens: int | None,
         speculative_mode: str, spec_draft_length: int | None,
         additional_models: tuple[str, ...]) -> None:
    """Chat with MODEL in the terminal (streamed answers, multi-turn history).

    MODEL: an MLC model dir, HF://org/repo, or SmolLM2-135M-Instruct.
    """
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    from mlc.runtime.engine import MLCEngine

    click.echo(f"Loading {model} ...")
    engine = MLCEngine(model, device, model_lib=model_lib, mode="interactive",
                       speculative_mode=speculative_mode, spec_draft_length=spec_draft_length,
                       additional_models=list(additional_models))
    try:
        ChatSession(engine, system, temperature=temperature, top_p=top_p,
                    max_tokens=max_tokens).run()
    finally:
        engine.terminate()
