"""`mlc chat`, driven through a pseudo-terminal with pexpect on SmolLM2-135M (q4f32_1, CPU):
streamed answers, multi-turn history, /stats, /reset, /help, Ctrl-C during an answer, and
leaving with /exit, Ctrl-D or Ctrl-C at the prompt."""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.slow

PROMPT = ">>> "
STATS = re.compile(r"prefill: ([\d.]+) tok/s \((\d+) tokens.*decode: ([\d.]+) tok/s "
                   r"\((\d+) tokens")


def _default_sigint() -> None:
    # A test run started in the background by a non-interactive shell ignores SIGINT, and a
    # child inherits that: Ctrl-C must reach `mlc chat` as it does in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_chat(model_dir: Path, *args: str):
    child = pexpect.spawn(sys.executable, ["-m", "mlc", "chat", str(model_dir), "--device",
                                           "cpu", *args], encoding="utf-8", timeout=180,
                          dimensions=(50, 200), preexec_fn=_default_sigint)
    child.expect_exact(PROMPT)
    return child


def ask(child, question: str) -> list[tuple[float, str]]:
    """Send a question; return the answer's output pieces with their arrival times."""
    child.sendline(question)
    child.expect_exact(question)              # the terminal's echo
    pieces, text = [], ""
    deadline = time.monotonic() + 180
    while PROMPT not in text:
        assert time.monotonic() < deadline, f"no prompt after the answer: {text!r}"
        try:
            piece = child.read_nonblocking(4096, timeout=5)
        except pexpect.TIMEOUT:
            continue
        pieces.append((time.monotonic(), piece))
        text += piece
    return pieces


def answer_text(pieces) -> str:
    return "".join(p for _, p in pieces).split(PROMPT)[0].strip()


def stats(child) -> tuple[float, int, float, int]:
    child.sendline("/stats")
    child.expect(STATS)
    prefill_rate, prompt_tokens, decode_rate, decode_tokens = child.match.groups()
    child.expect_exact(PROMPT)
    return float(prefill_rate), int(prompt_tokens), float(decode_rate), int(decode_tokens)


def test_chat_session(smol_engine_dir):
    child = spawn_chat(smol_engine_dir, "--system", "Be brief.", "--temperature", "0",
                       "--max-tokens", "48")
    child.sendline("/stats")
    child.expect_exact("no answer yet")
    child.expect_exact(PROMPT)

    pieces = ask(child, "Write a sentence about the sea.")
    assert answer_text(pieces)
    streamed = [p for _, p in pieces if p.strip() and PROMPT not in p]
    assert len(streamed) > 1, "the answer was not streamed"
    prefill_rate, first_prompt, decode_rate, decoded = stats(child)
    assert prefill_rate > 0 and decode_rate > 0 and first_prompt > 0 and decoded > 0

    assert answer_text(ask(child, "And one about the sky."))
    second_prompt = stats(child)[1]
    assert second_prompt > first_prompt + decoded      # the history was sent again

    child.sendline("/reset")
    child.expect_exact("conversation cleared")
    child.expect_exact(PROMPT)
    assert answer_text(ask(child, "Write a sentence about the sea."))
    assert stats(child)[1] == first_prompt             # only the system prompt was kept

    # Ctrl-C while the answer streams: it stops, and the chat goes on
    child.sendline("Tell me a very long story about a dragon.")
    child.expect_exact("dragon.")
    child.expect(r"\S")                                # the first streamed text
    child.sendcontrol("c")
    child.expect_exact("(answer stopped)")
    child.expect_exact(PROMPT)
    assert answer_text(ask(child, "Say hello."))

    child.sendline("/help")
    child.expect_exact("/reset")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("key", ["d", "c"])
def test_ctrl_d_or_ctrl_c_at_the_prompt_exits(smol_engine_dir, key):
    child = spawn_chat(smol_engine_dir)
    child.sendcontrol(key)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
