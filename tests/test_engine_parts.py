"""The engine core's parts on their own, without a model: the Scheduler over a KV cache that
counts pages (and fails on any overcommit), the OutputProcessor over a real BPE tokenizer
with scripted tokens, and both together with random logits.

A page size of 4 (not TVM's 16) checks that nothing assumes one.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import write_tiny_tokenizer

from mlc.runtime.generation_config import GenerationConfig
from mlc.runtime.logit_processor import LogitProcessor
from mlc.runtime.output_processor import OutputProcessor
from mlc.runtime.request import EngineLimits, Request, StepCounters
from mlc.runtime.sampler import HostSampler, SampledToken
from mlc.runtime.scheduler import Scheduler, StepKind
from mlc.runtime.step import make_actions

PAGE = 4


class PageCountingKV:
    """A KV cache that owns ceil(len / page) pages per sequence (a fork copies them) and
    raises when a step appends beyond its capacity."""

    def __init__(self, total_pages: int, page_size: int = PAGE):
        self.page_size, self.total_pages = page_size, total_pages
        self.lengths: dict[int, int] = {}

    def used(self) -> int:
        return sum(-(-n // self.page_size) for n in self.lengths.values())

    def free_pages(self) -> int:
        return self.total_pages - self.used()

    def add_sequence(self, seq_id: int) -> None:
        assert seq_id not in self.lengths
        self.lengths[seq_id] = 0

    def remove_sequence(self, seq_id: int) -> None:
        del self.lengths[seq_id]

    def fork_sequence(self, parent: int, child: int) -> None:
        self.lengths[child] = self.lengths[parent]
        assert self.used() <= self.total_pages, "fork beyond the cache"

    def append(self, seq_id: int, n: int) -> None:
        self.lengths[seq_id] += n
        assert self.used() <= self.total_pages, "the scheduler overcommitted the KV cache"


class RandomLogitsRunner(PageCountingKV):
    """A ModelRunner without a model: random logits, real page accounting."""

    def __init__(self, total_pages: int, vocab: int, seed: int = 0):
        super().__init__(total_pages)
        self.vocab_size, self.device_kind, self.sampling = vocab, "cpu", {}
        self.rng = np.random.default_rng(seed)

    def _logits(self, rows: int) -> np.ndarray:
        return self.rng.standard_normal((rows, self.vocab_size)).astype(np.float32) * 3

    def prefill_logits(self, seq_ids, token_lists):
        for s, toks in zip(seq_ids, token_lists):
            self.append(s, len(toks))
        return self._logits(len(seq_ids))

    def decode_logits(self, seq_ids, tokens):
        for s in seq_ids:
            self.append(s, 1)
        return self._logits(len(seq_ids))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    return Tokenizer.from_file(str(d / "tokenizer.json"))


def limits(batch=4, total=256, chunk=8, ctx=256) -> EngineLimits:
    return EngineLimits(batch, total, chunk, ctx)


def request(rid, prompt, tokenizer=None, n=1, **cfg) -> Request:
    config = GenerationConfig(n=n, **cfg).with_defaults({})
    return Request(rid, prompt, config, tokenizer, set(), lambda out: None)


def run_step(sched: Scheduler, kv: PageCountingKV, token: int = 7):
    """Schedule and 'run' one step by hand: append the chunks, give each sequence whose
    prompt is complete one token, end sequences at max_tokens."""
    batch = sched.schedule()
    if batch is None:
        return None
    for seq, chunk in zip(batch.seqs, batch.chunks):
        kv.append(seq.seq_id, len(chunk))
        seq.num_cached += len(chunk)
        if seq.pending == 0:
            seq.tokens.append(token)
            seq.num_generated += 1
            if seq.num_generated >= seq.config.max_tokens:
                sched.finish(seq, "length")
    sched.release_finished()
    return batch


# ------------------------------------------------------------------------------ Scheduler


def test_admission_is_bounded_by_batch_slots():
    kv = PageCountingKV(1000)
    sched = Scheduler(kv, limits(batch=2))
    reqs = [request(f"r{i}", [1, 2, 3], max_tokens=5) for i in range(3)]
    for r in reqs:
        sched.add(r)
    batch = sched.schedule()
    assert [r.request_id for r in sched.running] == ["r0", "r1"]
    assert list(sched.waiting) == [reqs[2]]
    assert batch.kind is StepKind.PREFILL and batch.chunks == [[1, 2, 3], [1, 2, 3]]
    two = request("two", [4, 5], n=2, max_tokens=3)       # n choices take n slots
    sched.add(two)
    while sched.has_work():
        run_step(sched, kv)
        held = sum(1 for r in sched.running for s in r.seqs if s.in_cache)
        assert held <= 2
    assert kv.lengths == {} and kv.free_pages() == 1000


def test_admission_waits_for_pages_and_uses_the_caches_page_size():
    kv = PageCountingKV(10)
    sched = Scheduler(kv, limits(chunk=64))
    assert sched.pages_for(5) == 2 and sched.pages_for(4) == 1
    big = request("big", list(range(30)), max_tokens=2)   # ceil(31 / 4) = 8 pages
    small = request("small", list(range(10)), max_tokens=2)  # 3 pages: 8 + 3 > 10
    sched.add(big)
    sched.add(small)
    run_step(sched, kv)
    assert [r.request_id for r in sched.running] == ["big"] and list(sched.waiting) == [small]
    run_step(sched, kv)                                    # big's second token: it finishes
    assert sched.running == [] and kv.lengths == {}
    run_step(sched, kv)
    assert [r.request_id for r in sched.running] == ["small"]


def test_prefill_chunks_share_the_budget_and_alternate_with_decode():
    kv = PageCountingKV(1000)
    sched = Scheduler(kv, limits(chunk=8))
    a = request("a", list(range(12)), max_tokens=4)
    sched.add(a)
    first = run_step(sched, kv)
    assert first.kind is StepKind.PREFILL and first.chunks == [list(range(8))]
    b = request("b", list(range(100, 105)), max_tokens=4)
    sched.add(b)
    second = run_step(sched, kv)                           # a's rest + 4 of b's 5 tokens
    assert second.chunks == [list(range(8, 12)), list(range(100, 104))]
    third = run_step(sched, kv)         # no prefill twice in a row while a sequence decodes;
    assert third.kind is StepKind.DECODE            # b's one last prompt token decodes too
    assert [s.request for s in third.seqs] == [a, b] and third.chunks == [[7], [104]]


def test_preemption_frees_the_newest_and_recomputes_it():
    kv = PageCountingKV(6)                                 # 24 tokens of KV
    counters = StepCounters()
    sched = Scheduler(kv, limits(chunk=64), counters)
    old = request("old", list(range(7)), max_tokens=12)    # admitted: 2 pages each
    new = request("new", list(range(50, 57)), max_tokens=12)
    sched.add(old)
    sched.add(new)
    run_step(sched, kv)
    assert len(sched.running) == 2
    preempted_at = None
    for step in range(40):
        run_step(sched, kv, token=100 + step)
        if counters.preemptions and preempted_at is None:
            preempted_at = step
            assert sched.waiting[0] is new and [r for r in sched.running] == [old]
            seq = new.seqs[0]
            assert not seq.in_cache and seq.num_cached == 0 and seq.seq_id not in kv.lengths
            kept = list(seq.tokens)                        # prompt + generated, kept
            assert len(kept) > 7
        if not sched.has_work():
            break
    assert preempted_at is not None and not sched.has_work()
    assert new.seqs[0].tokens[:len(kept)] == kept          # recomputed, then continued
    assert all(s.num_generated == 12 for r in (old, new) for s in r.seqs)
    assert kv.lengths == {}


def test_choices_that_outgrow_a_cache_with_nothing_to_preempt_end_with_length():
    kv = PageCountingKV(5)
    sched = Scheduler(kv, limits(chunk=64))
    req = request("n3", [1, 2, 3], n=3, max_tokens=50)
    sched.add(req)
    batch = sched.schedule()
    kv.append(req.seqs[0].seq_id, 3)
    req.seqs[0].num_cached = 3
    children = sched.fork_choices(req.seqs[0])
    assert [c.index for c in children] == [1, 2] and req.forked
    assert all(kv.lengths[c.seq_id] == 3 for c in children)
    ended = []
    for _ in range(20):
        for s in req.seqs:
            if not s.finish_reason and s.pending == 0:
                s.tokens.append(9)
        batch = sched.schedule()
        if batch is None:
            break
        ended += batch.ended
        for seq, chunk in zip(batch.seqs, batch.chunks):
            kv.append(seq.seq_id, len(chunk))
            seq.num_cached += len(chunk)
        sched.release_finished()
    assert ended and all(s.finish_reason == "length" for s in ended)
    assert all(s.seq_id not in kv.lengths for s in ended)


def test_abort_frees_pages_and_forgets_the_request():
    kv = PageCountingKV(100)
    sched = Scheduler(kv, limits())
    a, b = request("a", [1, 2, 3], max_tokens=9), request("b", [4, 5], max_tokens=9)
    sched.add(a)
    sched.add(b)
    run_step(sched, kv)
    assert sched.abort("a") is a and a.seqs[0].finish_reason == "abort"
    assert a.seqs[0].seq_id not in kv.lengths and sched.running == [b]
    assert sched.abort("a") is None and sched.abort("never") is None
    waiting = request("w", [1], max_tokens=1)
    sched.add(waiting)
    assert sched.abort("w") is waiting and not sched.waiting


# ------------------------------------------------------------------------------ OutputProcessor


class Recording(LogitProcessor):
    """Records accepted tokens; finishes after `finish_after` of them; optional mask."""

    def __init__(self, finish_after=None, allowed=None, vocab=300):
        self.accepted: list[int] = []
        self.finish_after = finish_after
        self.mask = None
        if allowed is not None:
            self.mask = np.zeros(vocab, dtype=bool)
            self.mask[list(allowed)] = True

    def token_mask(self):
        return self.mask

    def accept(self, token_id):
        self.accepted.append(token_id)

    def is_finished(self):
        return self.finish_after is not None and len(self.accepted) >= self.finish_after

    def rollback(self, n):
        del self.accepted[len(self.accepted) - n:]

    def fork(self):
        other = Recording(self.finish_after)
        other.accepted, other.mask = list(self.accepted), self.mask
        return other


def sequence(tokenizer, prompt_text="Hello", processors=(), **cfg):
    from mlc.runtime.request import Sequence

    prompt = tokenizer.encode(prompt_text).ids
    req = Request("r", prompt, GenerationConfig(**cfg).with_defaults({}), tokenizer, {0},
                  lambda out: None)
    return Sequence(0, 0, req, list(processors))


def text_tokens(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text and len(ids) >= 4, ids
    return ids


def toks(ids):
    return [SampledToken(int(t)) for t in ids]


def test_several_tokens_per_step_make_one_delta(tokenizer):
    out = OutputProcessor(HostSampler(), limits())
    seq = sequence(tokenizer)
    ids = text_tokens(tokenizer, " the quick brown fox")
    [(s, d)] = out.accept([(seq, toks(ids[:3]))])
    [(_, d2)] = out.accept([(seq, toks(ids[3:]))])
    assert d.token_ids == ids[:3] and d2.token_ids == ids[3:]
    assert d.text + d2.text == " the quick brown fox" and seq.num_generated == len(ids)
    assert d.finish_reason is None and seq.tokens[-len(ids):] == ids


def test_stop_string_spanning_tokens_inside_one_step_drops_the_rest(tokenizer):
    ids = text_tokens(tokenizer, " the quick brown fox")
    pieces = [tokenizer.decode(ids[:k]) for k in range(1, len(ids) + 1)]
    full = pieces[-1]
    # a stop string across the boundary of two tokens in the middle, first seen there
    cut = next(k for k in range(1, len(ids) - 1)
               if full.find(pieces[k - 1][-1] + pieces[k][len(pieces[k - 1])]) ==
               len(pieces[k - 1]) - 1)
    stop = pieces[cut - 1][-1] + pieces[cut][len(pieces[cut - 1])]
    rec = Recording()
    seq = sequence(tokenizer, processors=[rec], stop_strs=[stop])
    out = OutputProcessor(HostSampler(), limits())
    [(_, d)] = out.accept([(seq, toks(ids))])
    assert d.finish_reason == "stop" and d.text == pieces[cut][:pieces[cut].index(stop)]
    assert d.token_ids == ids[:cut + 1] and seq.num_generated == cut + 1
    assert rec.accepted == ids[:cut + 1]                  # the processor forgot the rest
    assert seq.tokens[len(seq.request.prompt_ids):] == ids[:cut + 1]


def test_stop_string_spanning_steps_is_never_leaked(tokenizer):
    ids = text_tokens(tokenizer, " the quick brown fox")
    full = tokenizer.decode(ids)
    stop = full[len(tokenizer.decode(ids[:2])) - 1:][:3]   # starts in token 2, ends later
    seq = sequence(tokenizer, stop_strs=[stop])
    out = OutputProcessor(HostSampler(), limits())
    texts, reason = [], None
    for t in ids:
        [(_, d)] = out.accept([(seq, toks([t]))])
        texts.append(d.text)
        reason = d.finish_reason
        if reason:
            break
    assert reason == "stop" and "".join(texts) == full[:full.index(stop)]
    assert not any(stop[:2] in t for t in texts)


def test_stop_token_processor_finish_and_max_tokens(tokenizer):
    ids = text_tokens(tokenizer, " the quick brown fox")
    out = OutputProcessor(HostSampler(), limits())
    seq = sequence(tokenizer)                             # token 0 is a stop id here
    [(_, d)] = out.accept([(seq, toks([ids[0], 0, ids[1]]))])
    assert d.finish_reason == "stop" and d.token_ids == [ids[0], 0]
    assert d.text == tokenizer.decode([ids[0]]) and seq.num_generated == 2
    done = Recording(finish_after=2)
    seq = sequence(tokenizer, processors=[done])
    [(_, d)] = out.accept([(seq, toks(ids))])
    assert d.finish_reason == "stop" and d.token_ids == ids[:2]
    assert d.text == tokenizer.decode(ids[:2])            # the finishing token's text is kept
    seq = sequence(tokenizer, max_tokens=3)
    [(_, d)] = out.accept([(seq, toks(ids))])
    assert d.finish_reason == "length" and d.text == tokenizer.decode(ids[:3])


def test_masks_restrict_what_is_sampled(tokenizer):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 300)).astype(np.float32) * 5
    allowed = {17, 42, 99}
    out = OutputProcessor(HostSampler(), limits())
    for temperature in (0.0, 1.5):
        seen = set()
        for i in range(40):
            seq = sequence(tokenizer, processors=[Recording(allowed=allowed)],
                           temperature=temperature, seed=i)
            [tok] = out.sampler.sample(logits, [1], [seq], [out.token_mask(seq)])
            seen.add(tok.token_id)
        assert seen <= allowed
        if temperature:
            assert len(seen) > 1
        else:
            assert seen == {max(allowed, key=lambda t: logits[1, t])}


# ------------------------------------------------------------------------------ together


def test_scheduler_actions_and_output_processor_run_without_a_model(tokenizer):
    runner = RandomLogitsRunner(total_pages=12, vocab=300)   # 48 tokens: forces preemption
    counters = StepCounters()
    lim = limits(batch=4, chunk=8)
    sched = Scheduler(runner, lim, counters)
    actions = make_actions(runner, sched, counters, sched.tracer)
    outputs = OutputProcessor(HostSampler(), lim)
    received: dict[str, list] = {}
    reqs = []
    for i, (prompt, n) in enumerate([("Hello there", 1), ("The quick brown fox", 2),
                                     ("A B C", 1)]):
        ids = tokenizer.encode(prompt).ids
        cfg = GenerationConfig(n=n, max_tokens=9, temperature=1.0, seed=i).with_defaults({})
        req = Request(f"r{i}", ids, cfg, tokenizer, set(),
                      lambda out, i=i: received.setdefault(f"r{i}", []).append(out))
        reqs.append(req)
        sched.add(req)
    for _ in range(500):
        batch = sched.schedule()
        if batch is None:
            break
        for seq, delta in outputs.process(actions[batch.kind].run(batch), batch.ended):
            if delta.finish_reason:
                sched.finish(seq, delta.finish_reason)
            seq.request.sink(seq.request.output([delta]))
        sched.release_finished()
    assert not sched.has_work() and runner.lengths == {}
    assert counters.preemptions > 0
    for req in reqs:
        assert [s.index for s in req.seqs] == list(range(req.config.n))
        for s in req.seqs:
            assert s.finish_reason == "length" and s.num_generated == 9
            text = "".join(d.text for o in received[req.request_id] for d in o.deltas
                           if d.index == s.index)
            assert text == tokenizer.decode(s.tokens[len(req.prompt_ids):])
