"""Speculative decoding: a draft model proposes k tokens per decoding sequence, the target verifies all of
them in one packed forward (the chunk newest-token + k proposals), and keeps the longest accepted prefix
plus one token of its own.

Acceptance follows Leviathan et al. 2023: proposal d with draft prob q(d) is kept with probability
min(1, p(d)/q(d)); on rejection the token is drawn from norm(max(p − q, 0)). For greedy requests p and q
are one-hot, so this reduces to "keep while the draft's argmax equals the target's" and the output is
the target's own greedy output token for token.

The draft keeps its own paged cache (same block count as the target's, so whatever the target can hold
the draft can too) and a mirror of each sequence sharing the token lists; rejected tokens are rolled back
by truncating num_computed and the block tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.engine.attention import PagedKVCache
from llmopt.engine.block_manager import BlockManager
from llmopt.engine.engine import LLMEngine, model_dtype
from llmopt.engine.kv_format import resolve_kv_format
from llmopt.engine.model_runner import common_window, inspect_attention, make_runner
from llmopt.engine.sampling import probs, sample_rows
from llmopt.engine.sequence import Sequence
from llmopt.errors import LlmoptError


@dataclass(slots=True)
class SpecStats:
    proposed: int = 0
    accepted: int = 0
    verify_steps: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens each verification forward produced on average (accepted + the target's own)."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else None


def accept(target_probs: torch.Tensor, draft_probs: torch.Tensor | None, proposals: list[int],
           greedy: bool, generator: torch.Generator | None, uniforms: torch.Tensor | None = None) -> list[int]:
    """Pure acceptance rule. target_probs [k+1, V] (or logits when greedy), draft_probs [k, V]
    → the tokens to append (accepted proposals, then one token from the target).

    uniforms [k] in [0, 1): the acceptance draws, one per proposal; None draws them from `generator` in one
    call (tests pass fixed ones). Sampled requests read the device once: one copy of the accepted count and
    the distribution of the token after it.
    """
    if greedy:
        best = target_probs.argmax(-1).tolist()  # [k+1]
        j = 0
        while j < len(proposals) and proposals[j] == best[j]:
            j += 1
        return proposals[:j] + [best[j]]
    k, dev = len(proposals), target_probs.device
    # The requests' generators live on the CPU: the uniforms are drawn there; float64 keeps tiny ratios exact.
    if uniforms is None:
        uniforms = torch.rand(k, generator=generator, dtype=torch.float64)
    host_in = torch.stack([uniforms.double(), torch.tensor(proposals, dtype=torch.float64)])  # [2, k]
    u, d = host_in.to(dev).unbind(0)  # [k], [k]: one copy in
    d = d.long()
    p = target_probs.double()  # [k+1, V]
    # a zero draft row after the k real ones: the "residual" at k (every proposal accepted) is p[k] itself
    q = torch.cat([draft_probs.double(), p.new_zeros(1, p.shape[1])])  # [k+1, V]
    rows = torch.arange(k, device=dev)
    ok = u * q[rows, d] <= p[rows, d]  # [k]: u < p/q without dividing by a zero q
    j = ok.long().cumprod(0).sum().view(1)  # [1]: accepted prefix = index of the first rejection (or k)
    p_j, q_j = p.index_select(0, j)[0], q.index_select(0, j)[0]  # [V] each
    residual = (p_j - q_j).clamp_min(0)  # [V]; multinomial normalizes it
    weights = torch.where(residual.sum() > 0, residual, p_j)  # rounding can leave no residual mass: fall back to p
    host = torch.cat([j.double(), weights]).cpu()  # [1 + V]: one copy out
    n = int(host[0])
    return proposals[:n] + [int(torch.multinomial(host[1:], 1, generator=generator))]


class Speculator:
    def __init__(self, engine: LLMEngine, draft_model, k: int) -> None:
        if k < 1:
            raise LlmoptError(f"--spec-tokens must be ≥ 1 (got {k})")
        specs = inspect_attention(draft_model)
        vt = engine.model.get_output_embeddings().weight.shape[0]
        vd = draft_model.get_output_embeddings().weight.shape[0]
        if vt != vd:
            raise LlmoptError(f"draft vocabulary ({vd}) differs from the target's ({vt}): the draft must share "
                              f"the target's tokenizer")
        self.engine = engine
        self.model = draft_model
        self.k = k
        n = engine.blocks.stats.num_blocks
        self.blocks = BlockManager(n, engine.blocks.block_size, common_window(specs))
        # the draft's cache stores K/V as the target's does (--kv-dtype), resolved against the draft's own dtype
        fmt = resolve_kv_format(engine.config.kv_dtype, model_dtype(draft_model))
        self.cache = PagedKVCache.allocate(specs, n, engine.blocks.block_size, fmt,
                                           draft_model.get_input_embeddings().weight.device)
        self.runner = make_runner(draft_model, specs, self.cache, self.blocks, engine.config.decode_attention)
        self.mirrors: dict[int, Sequence] = {}
        self.stats = SpecStats()

    def add(self, seq: Sequence) -> None:
        mirror = Sequence(seq.id, seq.prompt, seq.params, seq.arrival, seq.eos_id)
        mirror.output = seq.output  # shared: proposals appended to the target's list are the draft's too
        if mirror.generator is not None:
            mirror.generator.manual_seed(seq.params.seed + 0x5EED)
        self.mirrors[seq.id] = mirror

    def release(self, seq: Sequence) -> None:
        mirror = self.mirrors[seq.id]
        self.blocks.release(mirror)
        mirror.num_computed = 0

    def on_preempted(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.release(seq)

    def _plan(self, seq: Sequence) -> int:
        """Proposals for seq this step (0 = plain decode), reserving target and draft blocks for them."""
        k = min(self.k, seq.params.max_tokens - len(seq.output) - 1)
        mirror = self.mirrors[seq.id]
        while k > 0:
            if (self.engine.blocks.can_reserve(seq, len(seq) + k)
                    and self.blocks.can_reserve(mirror, len(seq) + k - 1)):
                self.engine.blocks.reserve(seq, len(seq) + k)
                self.blocks.reserve(mirror, len(seq) + k - 1)
                return k
            k -= 1
        return 0

    def _propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[torch.Tensor]]:
        """Draft k tokens per sequence (appended to seq.output); returns the draft distributions used."""
        dists: list[list[torch.Tensor]] = [[] for _ in seqs]
        for r in range(max(ks, default=0)):
            live = [i for i, k in enumerate(ks) if k > r]
            mirrors = [self.mirrors[seqs[i].id] for i in live]
            logits = self.runner.forward([(m, m.pending) for m in mirrors])  # [B, V]
            for m in mirrors:
                m.num_computed = len(m)
            toks = sample_rows(logits, [m.params for m in mirrors], [m.generator for m in mirrors])
            for row, (i, tok) in enumerate(zip(live, toks)):
                if not seqs[i].params.greedy:
                    dists[i].append(probs(logits[row], seqs[i].params))
                seqs[i].output.append(tok)
        return dists

    def step(self, work: list[tuple[Sequence, int]]) -> list[Sequence]:
        decode = [seq for seq, n in work if n == 1 and seq.pending == 1]
        ks = [self._plan(seq) for seq in decode]
        spec = {seq.id: k for seq, k in zip(decode, ks)}
        bases = {seq.id: seq.num_computed for seq in decode}
        dists = dict(zip((s.id for s in decode), self._propose(decode, ks)))
        keep = [1 + spec.get(seq.id, 0) for seq, _ in work]
        target_work = [(seq, n + spec.get(seq.id, 0)) for seq, n in work]
        logits = self.engine.runner.forward(target_work, keep)  # [sum(keep), V]
        seqs, news = [], []
        row = 0
        for (seq, n), kp in zip(work, keep):
            rows = logits[row:row + kp]
            row += kp
            k = kp - 1
            if k == 0:
                seq.num_computed += n
                if seq.num_computed == len(seq):
                    seqs.append(seq)
                    news.append(sample_rows(rows, [seq.params], [seq.generator]))
                continue
            proposals = seq.output[-k:]
            del seq.output[-k:]
            target = rows if seq.params.greedy else torch.stack([probs(r, seq.params) for r in rows])
            new = accept(target, None if seq.params.greedy else torch.stack(dists[seq.id]), proposals,
                         seq.params.greedy, seq.generator)
            j = len(new) - 1
            self.stats.proposed += k
            self.stats.accepted += j
            self.stats.verify_steps += 1
            seq.num_computed = bases[seq.id] + 1 + j  # KV is right for the newest token and accepted proposals
            self.engine.blocks.truncate(seq, seq.num_computed)
            mirror = self.mirrors[seq.id]
            mirror.num_computed = min(mirror.num_computed, seq.num_computed)
            self.blocks.truncate(mirror, mirror.num_computed)
            seqs.append(seq)
            news.append(new)
        t = self.engine.now()  # after acceptance, whose copies to the host wait for the device
        return self.engine.append_tokens(seqs, news, t)


def attach_draft(engine: LLMEngine, draft_model, k: int) -> Speculator:
    """Make `engine` decode speculatively with `draft_model` proposing k tokens per step."""
    spec = Speculator(engine, draft_model, k)
    engine.speculator = spec
    engine.routed_models.append(draft_model)
    return spec
