"""Speculative decoding: drafters that propose tokens for the target model to verify.

- `NgramDrafter` (`speculative_mode="ngram"`, no draft model): a sequence's draft is what
  followed the most recent earlier occurrence of its last n tokens (n = 3, then 2, then 1) in
  its own tokens (prompt and generated text): summaries, code edits and RAG answers repeat
  long spans of their input.
- `ModelDrafter` (`speculative_mode="small_draft"`): a smaller model with the same vocabulary
  proposes its greedy continuation. It keeps its own KV cache: each sequence's draft KV is
  synced lazily before drafting (entries past the tokens the target accepted are popped, the
  missing ones prefilled), and freed when the sequence leaves the target's cache.
- `EagleDrafter` (`speculative_mode="eagle"`): an EAGLE-1/2 head (`mlc.models.eagle`) drafts
  a greedy chain from the target's final hidden states, which every target step hands it
  (`step.FeatureSink`); the head's outputs go through the target's LM head. Tree drafts are
  not made (see the README's "Speculative decoding").

The Scheduler asks the drafter for every decode sequence's draft (`propose`); the target
checks the drafts of the whole batch in one `batch_verify` call (`step.VerifyAction`), and
the OutputProcessor accepts them (`OutputProcessor.process_verify`).

Acceptance: at each draft position the target's token is sampled exactly as a plain decode
step would sample it (same processors, same random stream); the draft token is accepted when
it is the token drawn, and the first token that differs ends the step. Both drafters propose
one token per position (a point mass q = 1 at d), and for such a proposal this *is* the
rejection-sampling rule (accept d with probability min(1, p(d) / q(d)) = p(d); on rejection
draw from max(0, p - q) renormalised = p without d), so the output distribution is the
target's, and a seeded request draws the same tokens as without speculation. Greedy output
is identical token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlc.runtime.logit_processor import LogitProcessor

MAX_NGRAM = 3


def ngram_draft(tokens: list[int], k: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix
    n-gram (n <= max_ngram) of `tokens`; [] when no suffix recurs."""
    if k <= 0 or len(tokens) < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, len(arr) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)   # [L - n, n]
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return arr[start: start + k].tolist()
    return []


class NgramDrafter:
    """Prompt lookup: drafts from each sequence's own tokens."""

    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        return [ngram_draft(s.tokens, k) for s, k in zip(seqs, ks)]

    def release(self, seq) -> None:
        pass


class ModelDrafter:
    """A draft model's greedy tokens, over its own `ModelRunner` and KV cache."""

    def __init__(self, runner, prefill_chunk_size: int):
        self.runner = runner
        self.chunk = prefill_chunk_size
        self.cached: dict[int, tuple[int, list[int]]] = {}   # id(seq) -> (draft seq id, tokens)
        self._ids = 0

    def release(self, seq) -> None:
        entry = self.cached.pop(id(seq), None)
        if entry is not None:
            self.runner.remove_sequence(entry[0])

    def _sync(self, seq) -> tuple[int, list[int]] | None:
        """Make the draft cache hold seq.tokens[:-1]; returns (draft id, tokens still to
        feed: at least the last token). None when the draft cache has no room."""
        entry = self.cached.get(id(seq))
        if entry is None:
            self._ids += 1
            entry = (self._ids, [])
            self.runner.add_sequence(entry[0])
            self.cached[id(seq)] = entry
        sid, held = entry
        keep = 0
        while keep < len(held) and keep < len(seq.tokens) - 1 and held[keep] == seq.tokens[keep]:
            keep += 1
        if len(held) > keep:
            self.runner.popn(sid, len(held) - keep)
            del held[keep:]
        return sid, list(seq.tokens[keep:])

    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        work = []                                   # (index, draft id, tokens to feed)
        page = self.runner.page_size
        free = self.runner.free_pages()
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            if k <= 0:
                continue
            sid, feed = self._sync(seq)
            held = self.cached[id(seq)][1]
            need = -(-(len(held) + len(feed) + k) // page) - (-(-len(held) // page))
            if need > free:
                continue                            # no room in the draft cache: no draft
            free -= need
            work.append((i, sid, feed))
        if not work:
            return drafts
        # catch up (prefill the tokens the draft has not seen, in chunks), first draft token
        last_logits: dict[int, int] = {}
        pending = {i: feed for i, _, feed in work}
        ids = {i: sid for i, sid, _ in work}
        while pending:
            batch, budget = [], self.chunk
            for i, feed in list(pending.items()):
                if budget <= 0:
                    break
                take = feed[:budget]
                batch.append((i, take))
                budget -= len(take)
            logits = self.runner.prefill_logits([ids[i] for i, _ in batch],
                                                [t for _, t in batch]).numpy()
            for row, (i, take) in enumerate(batch):
                self.cached[id(seqs[i])][1].extend(take)
                rest = pending[i][len(take):]
                if rest:
                    pending[i] = rest
                else:
                    del pending[i]
                    last_logits[i] = int(np.argmax(logits[row]))
        for i in last_logits:
            drafts[i].append(last_logits[i])
        # k - 1 greedy decode steps for the sequences that want more
        while True:
            step = [i for i, _, _ in work if len(drafts[i]) < ks[i]]
            if not step:
                break
            logits = self.runner.decode_logits([ids[i] for i in step],
                                               [drafts[i][-1] for i in step]).numpy()
            for row, i in enumerate(step):
                self.cached[id(seqs[i])][1].append(drafts[i][-1])
                drafts[i].append(int(np.argmax(logits[row])))
        return drafts


@dataclass
class _HeadState:
    """One sequence's EAGLE head: target positions < `done` were fed to the head's KV with
    the target's features; `spec` draft entries follow them (popped before the next feed);
    `features[i]` is the target's final hidden state at position `base + i`."""

    base: int
    features: np.ndarray
    done: int
    head_id: int | None = None
    spec: int = 0


class EagleDrafter:
    """Greedy chains from an EAGLE head (`LoadedHead`) over the target's features.

    Alignment (EAGLE's): head position j reads the target's feature f_j and token x_{j+1}, and
    its output g_j gives the logits of x_{j+2} through the target's LM head. For a sequence of
    T tokens (the target's cache holds T - 1), the head is fed positions up to T - 2; g_{T-2}
    gives the first draft token d1, and each further step feeds (d_i, g_prev). The target's
    features of a step's positions are `record`ed by the step actions; a verify's rejected
    rows are overwritten by the next step's. A sequence that forked a cached prefix has no
    features for it: its head starts at the first position the target computed (drafts
    there see less context; verification keeps the output exact regardless).
    """

    def __init__(self, head, target, prefill_chunk_size: int):
        self.head, self.target = head, target
        self.chunk = min(prefill_chunk_size, head.metadata["prefill_chunk_size"])
        self.state: dict[int, _HeadState] = {}      # id(seq) -> its head state
        self._ids = 0

    @property
    def features(self):
        """The step actions hand the target's hidden states here."""
        return self

    # -- FeatureSink ------------------------------------------------------------------------
    def record(self, seq, start: int, rows: np.ndarray) -> None:
        st = self.state.get(id(seq))
        if st is not None and (start < st.done or start > st.base + len(st.features)):
            self.release(seq)          # a gap or a rewrite of consumed positions: start over
            st = None
        if st is None:
            self.state[id(seq)] = _HeadState(start, np.array(rows), start)
            return
        st.features = np.concatenate([st.features[: start - st.base], rows])

    def fork(self, parent, child) -> None:
        st = self.state.get(id(parent))
        if st is not None:
            self.state[id(child)] = _HeadState(st.base, st.features.copy(), st.done)

    def release(self, seq) -> None:
        st = self.state.pop(id(seq), None)
        if st is not None and st.head_id is not None:
            self.head.remove_sequence(st.head_id)

    # -- drafting ---------------------------------------------------------------------------
    def _feed(self, seq, st: _HeadState) -> tuple[list[int], np.ndarray] | None:
        """The tokens x_{j+1} and features f_j of the positions j the head still needs
        (done .. T - 2), or None when the features do not reach T - 2."""
        last = len(seq.tokens) - 2
        if last < st.done or st.base + len(st.features) <= last:
            return None
        return (list(seq.tokens[st.done + 1: last + 2]),
                st.features[st.done - st.base: last + 1 - st.base])

    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        work = []                                   # (index, state, tokens, features)
        page, free = self.head.page_size, self.head.free_pages()
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            st = self.state.get(id(seq))
            feed = self._feed(seq, st) if k > 0 and st is not None else None
            if feed is None:
                continue
            if st.head_id is None:
                self._ids += 1
                st.head_id = self._ids
                self.head.add_sequence(st.head_id)
            if st.spec:
                self.head.popn(st.head_id, st.spec)
                st.spec = 0
            held = st.done - st.base
            need = -(-(held + len(feed[0]) + k) // page) - (-(-held // page))
            if need > free:
                continue                            # no room in the head's cache: no draft
            free -= need
            work.append((i, st, *feed))
        if not work:
            return drafts
        last = self._catch_up(work)
        # d1 from g_{T-2}; then k - 1 steps feeding (d_i, g_prev)
        hidden = np.stack([last[i] for i, *_ in work])
        active = [i for i, *_ in work]
        states = {i: st for i, st, *_ in work}
        while active:
            logits = self.target.hidden_logits(hidden, np.arange(len(active))).numpy()
            for row, i in enumerate(active):
                drafts[i].append(int(np.argmax(logits[row])))
            keep = [r for r, i in enumerate(active) if len(drafts[i]) < ks[i]]
            if not keep:
                break
            active = [active[r] for r in keep]
            hidden = self.head.decode_hidden([states[i].head_id for i in active],
                                             [drafts[i][-1] for i in active], hidden[keep])
            for i in active:
                states[i].spec += 1
        return drafts

    def _catch_up(self, work) -> dict[int, np.ndarray]:
        """Feed every sequence's missing positions to the head, in prefill chunks; the head's
        output at each one's last position."""
        last: dict[int, np.ndarray] = {}
        pending = {i: (st, toks, feats) for i, st, toks, feats in work}
        while pending:
            batch, budget = [], self.chunk
            for i, (st, toks, feats) in list(pending.items()):
                if budget <= 0:
                    break
                take = min(len(toks), budget)
                batch.append((i, st, toks[:take], feats[:take]))
                budget -= take
            out = self.head.prefill_hidden([st.head_id for _, st, _, _ in batch],
                                           [t for _, _, t, _ in batch],
                                           np.concatenate([f for _, _, _, f in batch]))
            for row, (i, st, toks, feats) in enumerate(batch):
                st.done += len(toks)
                _, rest_t, rest_f = pending[i]
                if len(rest_t) > len(toks):
                    pending[i] = (st, rest_t[len(toks):], rest_f[len(toks):])
                else:
                    del pending[i]
                    last[i] = out[row]
                    st.features = st.features[st.done - st.base:]   # consumed: drop
                    st.base = st.done
        return last


def can_speculate(processors: list[LogitProcessor]) -> bool:
    """Whether every processor of a sequence can roll back rejected tokens."""
    return all(type(p).rollback is not LogitProcessor.rollback for p in processors)
