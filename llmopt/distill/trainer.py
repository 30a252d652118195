"""The distillation loop on `accelerate`: one code path for CPU, one GPU, or many (`accelerate launch`).

Everything that decides the trajectory is a pure function of (seed, step): which windows form a batch,
whether a batch is on-policy, the sampling generator of on-policy continuations. A checkpoint therefore
needs only the weights, optimizer, scheduler, RNG and step, and a resumed run retraces the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmopt.distill import losses
from llmopt.errors import LlmoptError
from llmopt.models.training import make_optimizer, make_scheduler
from llmopt.progress import Progress, emit
from llmopt.utils import atomic_dir, write_json

CKPT_FILES = ("module.safetensors", "optimizer.pt", "rng.pt", "state.json")
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True, slots=True)
class LossSettings:
    """What the loss of one batch is made of (alpha = 0 and no hidden weight: plain LM training)."""

    kind: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 1.0  # weight of the KD term; (1 − alpha) goes to the cross-entropy on the data
    hidden_weight: float = 0.0
    top_k: int = 0

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.hidden_weight > 0


@dataclass(frozen=True, slots=True)
class TrainSettings:
    steps: int
    batch_size: int  # windows per micro-batch per process
    grad_accum: int
    lr: float
    warmup: int
    weight_decay: float
    max_grad_norm: float
    seed: int
    loss: LossSettings
    on_policy_ratio: float = 0.0
    on_policy_tokens: int = 0  # tokens sampled from the student after a data prefix
    sample_temperature: float = 1.0
    save_every: int = 0
    run_key: str = ""  # hash of everything above plus models and data: a resume must match it

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise LlmoptError("--steps, --batch-size and --grad-accum must be positive")


@dataclass(frozen=True, slots=True)
class StepLog:
    """One optimizer step as the loss curve records it (loss parts averaged over micro-batches and processes)."""

    run: str
    step: int
    lr: float
    loss: float
    kd: float
    ce: float
    hidden: float
    on_policy: bool
    tokens_per_s: float


@dataclass(slots=True)
class TrainOutcome:
    curve: list[StepLog] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    resumed_from: int = 0


class DistillModule(torch.nn.Module):
    """The trained parameters: the student plus, for the hidden-state loss across widths, a projection."""

    def __init__(self, student: torch.nn.Module, teacher_width: int | None) -> None:
        super().__init__()
        self.student = student
        width = int(student.config.hidden_size)
        self.project = (torch.nn.Linear(width, teacher_width, bias=False)
                        if teacher_width is not None and teacher_width != width else None)

    def forward(self, input_ids: torch.Tensor, hidden: bool = False):
        return self.student(input_ids=input_ids, output_hidden_states=hidden, use_cache=False)


def is_on_policy(step: int, ratio: float) -> bool:
    """Exactly ⌊ratio·n⌋ of the first n steps are on-policy, spread evenly, with no RNG to checkpoint."""
    return math.floor((step + 1) * ratio) > math.floor(step * ratio)


class BatchPlan:
    """Which windows each process trains on at (step, micro-batch): a fresh seeded permutation per epoch."""

    def __init__(self, n_windows: int, batch_size: int, grad_accum: int, num_processes: int, rank: int,
                 seed: int) -> None:
        self.global_batch = batch_size * num_processes
        if n_windows < self.global_batch:
            raise LlmoptError(f"the training data holds {n_windows} windows, fewer than one batch of "
                              f"{self.global_batch}: give more data or lower --batch-size / --seq-len")
        self.n, self.bs, self.accum, self.rank, self.seed = n_windows, batch_size, grad_accum, rank, seed
        self.per_epoch = n_windows // self.global_batch
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))}
        return self._orders[epoch]

    def indices(self, step: int, micro: int) -> torch.Tensor:
        b = step * self.accum + micro  # global micro-batch number
        order = self._order(b // self.per_epoch)
        start = (b % self.per_epoch) * self.global_batch + self.rank * self.bs
        return order[start:start + self.bs]


@torch.no_grad()
def sample_continuation(model, prompt: torch.Tensor, new_tokens: int, temperature: float,
                        generator: torch.Generator) -> torch.Tensor:
    """Sample new_tokens from the model after prompt [B, P] with a KV cache → [B, P + new_tokens].

    A seeded generator (not model.generate's global RNG) keeps on-policy batches reproducible on resume.
    """
    # transformers 5 renamed the KV-cache argument `past_key_values` → `cache`; accept either.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=prompt, use_cache=True)
    seq, logits = prompt, out.logits[:, -1]  # [B, V]
    for i in range(new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(prompt.device)  # [B, 1]
        seq = torch.cat([seq, nxt], dim=1)
        if i + 1 < new_tokens:
            out = model(input_ids=nxt, use_cache=True, **{cache_arg: getattr(out, cache_arg)})
            logits = out.logits[:, -1]
    return seq


def _masks(seq_len: int, prompt_len: int | None, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(kd_mask, ce_mask) over the L−1 prediction positions; None means all positions.

    On-policy batches distil only where the student chose the token (position p predicts token p+1), and take
    the data cross-entropy only on the real data prefix: the student's own samples are no labels.
    """
    if prompt_len is None:
        return None, None
    pos = torch.arange(seq_len - 1, device=device)  # [L-1]
    kd = pos >= prompt_len - 1
    return kd[None], ~kd[None]  # [1, L-1]


def micro_batch_loss(module, teacher, x: torch.Tensor, settings: LossSettings, layer_map: list[tuple[int, int]],
                     prompt_len: int | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch x [B, L]: student forward, teacher forward (no grad), the weighted parts."""
    want_hidden = settings.hidden_weight > 0
    out = module(x, hidden=want_hidden)
    s_logits = out.logits[:, :-1]  # [B, L-1, V]: position p predicts token p+1
    kd_mask, ce_mask = _masks(x.shape[1], prompt_len, x.device)
    ce = None
    if settings.alpha < 1 and (ce_mask is None or bool(ce_mask.any())):
        ce = losses.ce_loss(s_logits, x[:, 1:], None if ce_mask is None else ce_mask.expand(x.shape[0], -1))
    kd = hid = None
    if settings.needs_teacher:
        with torch.no_grad():
            t_out = teacher(input_ids=x, output_hidden_states=want_hidden, use_cache=False)
        kd_m = None if kd_mask is None else kd_mask.expand(x.shape[0], -1)
        kd = losses.kd_loss(s_logits, t_out.logits[:, :-1], settings.kind, settings.temperature, settings.beta,
                            settings.top_k, kd_m)
        if want_hidden:
            unwrapped = module.module if hasattr(module, "module") else module
            hs = [out.hidden_states[i] for i, _ in layer_map]
            ht = [t_out.hidden_states[j] for _, j in layer_map]
            hid = losses.hidden_loss(hs, ht, unwrapped.project)
    zero = s_logits.new_zeros((), dtype=torch.float32)
    total = losses.combine(kd if kd is not None else zero, ce, settings.alpha, hid, settings.hidden_weight)
    parts = {name: part.detach().item() if part is not None else 0.0
             for name, part in (("kd", kd), ("ce", ce), ("hidden", hid))}
    return total, parts


# ---- checkpoints -----------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(root: Path, step: int, module, optimizer, scheduler, settings: TrainSettings,
                    curve: list[StepLog], micro_batches: int) -> Path:
    """Write root/step-NNNNNN atomically (a temp dir renamed at the end) with a hash manifest; keep the last few."""
    from safetensors.torch import save_model

    out = root / f"step-{step:06d}"
    root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, overwrite=True) as tmp:
        save_model(module, str(tmp / "module.safetensors"))  # handles tied (shared) weights
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        write_json(tmp / "state.json", {"step": step, "micro_batches": micro_batches, "run_key": settings.run_key,
                                        "scheduler": scheduler.state_dict(), "curve": [asdict(c) for c in curve]})
        write_json(tmp / "manifest.json", {name: _sha256(tmp / name) for name in CKPT_FILES})
    for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def remove_checkpoints(root: Path) -> None:
    """Delete a finished run's step-* checkpoints, and their folder once nothing else is in it."""
    for step in root.glob("step-*"):
        shutil.rmtree(step, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty (the user's own files) or already gone
        root.rmdir()


def find_checkpoint(path: Path) -> Path:
    """A checkpoint dir itself, or the newest step-* inside a checkpoint root."""
    path = Path(path)
    if not path.is_dir():
        raise LlmoptError(f"resume checkpoint {path} does not exist: give a step-N dir or the checkpoint folder")
    if (path / "manifest.json").exists() or (path / "state.json").exists():
        return path
    steps = sorted(path.glob("step-*"))
    if not steps:
        raise LlmoptError(f"{path} holds no step-* checkpoints to resume from")
    return steps[-1]


def verify_checkpoint(ckpt: Path, run_key: str) -> dict:
    """Check files against the manifest and the run key; returns state.json. Any damage → LlmoptError."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        for name in CKPT_FILES:
            if _sha256(ckpt / name) != manifest[name]:
                raise ValueError(f"{name} does not match its hash")
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LlmoptError(f"resume checkpoint {ckpt} is corrupt or incomplete ({type(e).__name__}: {e}): "
                          f"resume from an earlier step-* checkpoint or start afresh") from e
    if state.get("run_key") != run_key:
        raise LlmoptError(f"resume checkpoint {ckpt} was made with other arguments (models, data or training "
                          f"settings): rerun with the same arguments as the interrupted run")
    return state


def load_checkpoint(ckpt: Path, state: dict, module, optimizer, scheduler) -> None:
    from safetensors.torch import load_model

    try:
        load_model(module, str(ckpt / "module.safetensors"), strict=True)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise LlmoptError(f"cannot restore resume checkpoint {ckpt} ({type(e).__name__}): it was made for "
                          f"another student; rerun with the same arguments") from e
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---- the loop --------------------------------------------------------------------------------------------

def train(accelerator, student: torch.nn.Module, teacher, windows: torch.Tensor, settings: TrainSettings,
          run: str = "distill", layer_map: list[tuple[int, int]] | None = None, teacher_width: int | None = None,
          checkpoint_root: Path | None = None, resume: Path | None = None,
          progress: Progress | None = None) -> tuple[torch.nn.Module, TrainOutcome]:
    """Train `student` on windows [N, L] against `teacher` (None for plain LM training). Returns the trained
    (unwrapped) student and the loss curve. Checkpoints every settings.save_every steps into checkpoint_root.
    Every step is an Event (task = run; fields: loss, kd, ce, hidden, on_policy, tokens_per_s, eta_s)."""
    s = settings
    if s.loss.needs_teacher and teacher is None:
        raise ValueError("KD or hidden loss requested without a teacher")
    module = DistillModule(student, teacher_width if s.loss.hidden_weight > 0 else None)
    module.train()
    optimizer = make_optimizer(module, s.lr, s.weight_decay)
    # The scheduler is stepped by us once per optimizer step (not prepared: accelerate would step it
    # once per process).
    scheduler = make_scheduler(optimizer, s.steps, s.warmup)
    outcome = TrainOutcome()
    start = 0
    if resume is not None:
        ckpt = find_checkpoint(resume)
        state = verify_checkpoint(ckpt, s.run_key)
        load_checkpoint(ckpt, state, module, optimizer, scheduler)
        start = outcome.resumed_from = int(state["step"])
        outcome.curve = [StepLog(**c) for c in state["curve"]]
    module, optimizer = accelerator.prepare(module, optimizer)
    plan = BatchPlan(windows.shape[0], s.batch_size, s.grad_accum, accelerator.num_processes,
                     accelerator.process_index, s.seed)
    tokens_per_step = s.batch_size * windows.shape[1] * s.grad_accum * accelerator.num_processes
    t0, done = time.perf_counter(), 0
    for step in range(start, s.steps):
        on_policy = s.on_policy_ratio > 0 and is_on_policy(step, s.on_policy_ratio)
        lr = optimizer.param_groups[0]["lr"]
        sums = _optimizer_step(accelerator, module, teacher, windows, plan, s, step, on_policy, layer_map or [],
                               optimizer, scheduler)
        done += 1
        elapsed = time.perf_counter() - t0
        log = StepLog(run, step + 1, lr, sums["loss"], sums["kd"], sums["ce"], sums["hidden"], on_policy,
                      done * tokens_per_step / elapsed)
        outcome.curve.append(log)
        if accelerator.is_main_process:
            emit(progress, run, step + 1, s.steps, loss=log.loss, kd=log.kd, ce=log.ce, hidden=log.hidden,
                 on_policy=on_policy, tokens_per_s=log.tokens_per_s, eta_s=elapsed / done * (s.steps - step - 1))
        if s.save_every and checkpoint_root is not None and (step + 1) % s.save_every == 0 and step + 1 < s.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(checkpoint_root, step + 1, accelerator.unwrap_model(module), optimizer, scheduler,
                                s, outcome.curve, (step + 1) * s.grad_accum)
            accelerator.wait_for_everyone()
    outcome.tokens = s.steps * tokens_per_step  # seen by the final student, across a resume
    outcome.seconds = time.perf_counter() - t0
    outcome.tokens_per_s = done * tokens_per_step / max(outcome.seconds, 1e-9)  # this invocation's speed
    trained = accelerator.unwrap_model(module).student
    trained.eval()
    return trained, outcome


def _optimizer_step(accelerator, module, teacher, windows: torch.Tensor, plan: BatchPlan, s: TrainSettings,
                    step: int, on_policy: bool, layer_map: list[tuple[int, int]], optimizer, scheduler
                    ) -> dict[str, float]:
    """One optimizer step over s.grad_accum micro-batches (on-policy ones sampled from the student first);
    returns the step's mean loss parts, averaged over processes."""
    seq_len = windows.shape[1]
    sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "hidden": 0.0}
    for micro in range(s.grad_accum):
        x = windows[plan.indices(step, micro)].to(accelerator.device)  # [B, L]
        prompt_len = None
        if on_policy:
            prompt_len = seq_len - s.on_policy_tokens
            gen = torch.Generator().manual_seed(  # a stream per (seed, step, micro-batch, process)
                ((s.seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + accelerator.process_index)
            sampler = accelerator.unwrap_model(module).student
            sampler.eval()
            with accelerator.autocast():
                x = sample_continuation(sampler, x[:, :prompt_len], s.on_policy_tokens, s.sample_temperature, gen)
            sampler.train()
        sync = micro == s.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(module):
            loss, parts = micro_batch_loss(module, teacher, x, s.loss, layer_map, prompt_len)
            accelerator.backward(loss / s.grad_accum)
        sums["loss"] += loss.detach().item() / s.grad_accum
        for k, v in parts.items():
            sums[k] += v / s.grad_accum
    if s.max_grad_norm > 0:
        accelerator.clip_grad_norm_(module.parameters(), s.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.num_processes > 1:
        red = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), "mean")
        sums = dict(zip(sums, red.tolist(), strict=True))
    return sums
