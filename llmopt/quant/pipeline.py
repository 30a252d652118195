"""Layer-by-layer sequential calibration: the stateful part of quantization.

The model sits on the CPU; one decoder layer at a time moves to the device. Per layer:
  1. the built-in check: the float layer and the same layer with RTN weights on the check batches;
  2. calibration, by method:
     - GPTQ on Llama-style layers, "true sequential": the layer is cut at the inputs of its Linear groups
       (q/k/v → o → gate/up → down); each group's Hessian is gathered on inputs that went through the groups
       already quantized, then the group is quantized; every piece of the layer runs once per batch;
     - GPTQ on other layers, RTN, INT8: one forward gathers the statistics, the groups are quantized, one
       quantized forward produces the next layer's inputs (the outputs of the quantized model so far);
     - AWQ and SmoothQuant (W8A8): one float forward gathers the statistics and produces the next layer's
       inputs: like their reference implementations they calibrate on the float model's activations;
  3. the quantized layer's relative output error vs the float layer on the check batches, next to RTN's.
MoE layers (experts split per expert by families/moe.py) take the two-pass strategy; in its statistics pass every
expert runs on every token while the layer output keeps the true routing (moe.routing_calibration), and the tokens
routed to each expert go into the layer report.
Linears reading the same tensor (the registry's shared-input groups: q/k/v, gate/up, Phi's q/k/v/fc1, all experts'
gate/up) share one collector, so their Hessian is built once; AWQ/SmoothQuant fold through the registry's scale
groups (families/registry.py). Groups are quantized in order; a scale folded into an op that is an already-quantized
Linear (AWQ/SmoothQuant's v→o, up→down, fc1→fc2, or a fused qkv's v rows) divides that Linear's row scales: its
codes stay valid. With calib_dtype=bfloat16 the
forwards run under autocast; statistics, solves and the weights themselves stay fp32.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from llmopt.errors import LlmoptError
from llmopt.families import moe, registry
from llmopt.families.registry import LayerPlan, ScaleGroup, fold_scales
from llmopt.quant import awq as awq_mod
from llmopt.quant.gptq import HessianAccumulator, gptq_quantize
from llmopt.quant.rtn import fake_quantize_activations, rtn_quantize
from llmopt.quant.smoothquant import ActMaxAccumulator, smooth_scales, w8a8_quantize
from llmopt.checkpoint.types import QuantArgs, QuantizedWeight

CHECK_TOKENS = 1024  # calibration tokens on which each layer's output error is measured

ProgressFn = Callable[[int, int], None]  # (layers done, layers total)


@dataclass(slots=True)
class LayerReport:
    """Built-in check of one decoder layer (or the lm_head): relative output error on the check samples."""

    name: str
    error: float  # ‖Y_method − Y_float‖ / ‖Y_float‖
    rtn_error: float  # same for RTN at the same bits/group/sym
    seconds: float
    detail: dict = field(default_factory=dict)  # e.g. AWQ's α per scale group

    @property
    def vs_rtn(self) -> float:
        return self.error / self.rtn_error if self.rtn_error > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "vs_rtn": self.vs_rtn}


@dataclass(slots=True)
class PipelineResult:
    qweights: dict[str, QuantizedWeight]
    layers: list[LayerReport]
    seconds: float


class _Stop(Exception):
    """Raised by the capture hook to stop the forward pass at the first decoder layer."""


def decoder_layers(model) -> tuple[nn.Module, nn.ModuleList, str]:
    """(decoder, its layers, the layers' module name) of a transformers causal LM (families/registry.py)."""
    return registry.decoder_layers(model)


def check_finite_weights(model) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise LlmoptError(f"weight {name} contains NaN or Inf: the checkpoint is corrupt; quantize a valid one")


def _layer_out(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _check_finite(y: torch.Tensor, where: str) -> None:
    if not torch.isfinite(y).all():
        raise LlmoptError(f"NaN or Inf in the activations of {where}: the model overflows on the calibration data "
                          f"(try --dtype float32 or other calibration text)")


@torch.no_grad()
def capture_inputs(model, input_ids: torch.Tensor, batch_size: int, device: torch.device
                   ) -> list[tuple[torch.Tensor, dict]]:
    """Inputs of the first decoder layer for each calibration batch: (hidden [B, L, H], layer kwargs)."""
    decoder, layers, _ = decoder_layers(model)
    for child in decoder.children():
        if child is not layers:  # embeddings, rotary tables, final norm: small, kept on the device
            child.to(device)
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            with contextlib.suppress(_Stop):
                decoder(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


@contextlib.contextmanager
def _hooks(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Forward pre-hooks calling fn(name, input); a returned tensor replaces the input."""
    handles = []
    for name, mod in modules.items():
        def hook(_m, args, _name=name):
            y = fn(_name, args[0])
            return None if y is None else (y, *args[1:])
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _stop(_name: str, _x: torch.Tensor) -> None:
    raise _Stop


def act_quant_hooks(modules: dict[str, nn.Module]):
    """Dynamic per-token INT8 activation fake-quantization on these Linears (W8A8 simulation)."""
    return _hooks(modules, lambda _n, x: fake_quantize_activations(x, 8))


def _owners(names: list[str], plan: LayerPlan) -> dict[str, str]:
    """Linear name → name of the Linear whose collector it shares (itself unless a sibling reads the same input:
    the registry's shared-input groups, which include every expert of an MoE block under calibrate_all)."""
    owner = {n: n for n in names}
    present = set(names)
    for group in plan.inputs:
        members = [m for m in group if m in present]
        for m in members[1:]:
            owner[m] = members[0]
    return owner


class _ErrorMeter:
    """Σ‖y − ref‖² and Σ‖ref‖² in float64 → relative error."""

    __slots__ = ("num", "den")

    def __init__(self) -> None:
        self.num = 0.0
        self.den = 0.0

    def add(self, y: torch.Tensor, ref: torch.Tensor) -> None:
        self.num += (y.double() - ref.double()).pow(2).sum().item()
        self.den += ref.double().pow(2).sum().item()

    @property
    def value(self) -> float:
        return math.sqrt(self.num / self.den) if self.den > 0 else 0.0


class LayerQuantizer:
    """Per-method part of the pipeline: what to collect, and how to quantize a group of Linears from it."""

    def __init__(self, method: str, qargs: QuantArgs, config, total_tokens: int,
                 calib_dtype: torch.dtype | None = None) -> None:
        self.method = method
        self.qargs = qargs
        self.config = config
        self.total_tokens = total_tokens
        self.act_bits = 8 if method == "w8a8" else None
        # AWQ and SmoothQuant calibrate every layer on the float model's activations, as their reference
        # implementations do (their scales keep the float function unchanged); GPTQ on the quantized one's
        self.float_inputs = method in ("awq", "w8a8")
        self.calib_dtype = calib_dtype  # bfloat16: layer forwards under autocast, statistics and solves in fp32

    def forwards(self, device: torch.device):
        """Context for the layer forwards: autocast to calib_dtype (weights stay fp32), else nothing."""
        if self.calib_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.calib_dtype, cache_enabled=False)  # no cache: weights change

    def collector(self, n_in: int, device: torch.device):
        if self.method == "gptq":
            return HessianAccumulator(n_in, device)
        if self.method == "awq":
            return awq_mod.AwqStats(n_in, self.qargs.group_size, self.total_tokens, device)
        if self.method == "w8a8":
            return ActMaxAccumulator(n_in, device)
        return None  # rtn, int8: data-free

    @torch.no_grad()
    def quantize_group(self, layer: nn.Module, names: list[str], linears: dict[str, nn.Module], stat,
                       done: dict[str, QuantizedWeight], plan: LayerPlan | None
                       ) -> tuple[dict[str, QuantizedWeight], dict]:
        """Quantize the target Linears `names` that read one input (stat: its collector; None when data-free),
        in place (dequantized weights written back). AWQ/SmoothQuant first fold their per-input-channel scales s
        into the op before; when that op is a Linear of this layer already quantized (in `done`), its codes stay
        and only its row scales (and bias) are divided by s. Returns (codes, detail)."""
        detail: dict = {}
        s = None
        group = _scale_group(plan, names[0]) if self.method in registry.SCALE_METHODS and plan is not None \
            else None
        if group is not None:
            if self.method == "w8a8":
                s = smooth_scales(stat.amax, [layer.get_submodule(n).weight for n in group.linears],
                                  self.qargs.smoothquant_alpha)
            else:
                s, alpha, loss, rtn_loss = awq_mod.search_scales(stat.tokens(), stat.mean_abs(),
                                                                 [linears[n].weight for n in names], self.qargs)
                detail[group.prev] = {"alpha": alpha, "loss_vs_rtn": loss / rtn_loss if rtn_loss > 0 else 1.0}
            fold_scales(layer, group, s)
            if group.prev in done:  # rows of a quantized Linear / s: same codes, scales / s
                _divide_rows(done[group.prev], group, s)
        if self.method == "gptq":
            hessian = stat.hessian()
            out = {}
            for chunk in _row_chunks(names, linears):
                out.update(self._gptq_stacked(chunk, linears, hessian))
        else:
            out = {}
            gram = None
            if self.method == "awq":
                gram = stat.gram_blocks()  # [G, gs, gs] of the unscaled input, shared by the group
                if s is not None:  # the Linears now read x / s
                    sg = s.view(gram.shape[0], -1)  # [G, gs]
                    gram = gram / (sg.unsqueeze(2) * sg.unsqueeze(1))
            for name in names:
                w = linears[name].weight.detach().float()  # [out, in]
                if self.method == "awq":
                    out[name] = awq_mod.awq_quantize(w, gram, self.qargs)
                elif self.method == "w8a8":
                    out[name] = w8a8_quantize(w, self.qargs)
                else:  # rtn, int8 (int8 = RTN at 8 bits per channel)
                    out[name] = rtn_quantize(w, self.qargs)
        for name, qw in out.items():
            lin = linears[name]
            qw.bias = None if lin.bias is None else lin.bias.detach().clone()
            lin.weight.copy_(qw.dequantize(lin.weight.dtype))
            out[name] = _to_cpu(qw)  # codes wait for the writer in host memory, not on the device
        return out, detail

    def _gptq_stacked(self, names: list[str], linears: dict[str, nn.Module], hessian: torch.Tensor
                      ) -> dict[str, QuantizedWeight]:
        """GPTQ of Linears sharing an input as ONE stacked matrix: rows are independent given H, so stacking
        q/k/v (gate/up) gives the same codes with one factorisation and one column loop instead of three."""
        w = torch.cat([linears[n].weight.detach().float() for n in names])  # [Σout, in]
        qw = gptq_quantize(w, hessian, self.qargs)
        out: dict[str, QuantizedWeight] = {}
        start = 0
        for n in names:
            rows = slice(start, start + linears[n].out_features)
            start = rows.stop
            out[n] = QuantizedWeight(qw.qweight[rows].clone(), qw.scales[rows].clone(), qw.zeros[rows].clone(),
                                     None if qw.g_idx is None else qw.g_idx.clone(), qw.bits, qw.group_size, qw.sym)
        return out


STACK_ROWS = 1 << 15  # most rows GPTQ stacks at once: all of an MoE block's experts read one input


def _row_chunks(names: list[str], linears: dict[str, nn.Module]) -> list[list[str]]:
    """Consecutive runs of `names` of at most STACK_ROWS output rows (at least one Linear each): Mixtral-8x7B's
    16 expert gate/up matrices stacked whole would be a 3.7 GB float32 matrix, copied several times by GPTQ."""
    chunks: list[list[str]] = [[]]
    rows = 0
    for n in names:
        if chunks[-1] and rows + linears[n].out_features > STACK_ROWS:
            chunks.append([])
            rows = 0
        chunks[-1].append(n)
        rows += linears[n].out_features
    return chunks


def _scale_group(plan: LayerPlan, first: str) -> ScaleGroup | None:
    """The foldable group whose Linears include `first` (None: nothing precedes it that can take a scale)."""
    return next((g for g in plan.scales if first in g.linears), None)


def _divide_rows(qw: QuantizedWeight, group: ScaleGroup, s: torch.Tensor) -> None:
    """The producer of a fold is a Linear already quantized: its (group's) output rows / s keep the codes and
    divide the row scales (and bias) instead."""
    rows = slice(None) if group.rows is None else group.rows.to(qw.scales.device)
    sc = s.to(device=qw.scales.device, dtype=qw.scales.dtype)
    scales = qw.scales.clone()  # [out, G]
    scales[rows] = scales[rows] / sc.unsqueeze(1)
    qw.scales = scales
    if qw.bias is not None:
        bias = qw.bias.clone()
        bias[rows] = bias[rows] / s.to(device=bias.device, dtype=bias.dtype)
        qw.bias = bias


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    if qw.qweight.device.type == "cpu":
        return qw
    def cpu(t):
        return None if t is None else t.cpu()
    return QuantizedWeight(qw.qweight.cpu(), qw.scales.cpu(), qw.zeros.cpu(), cpu(qw.g_idx), qw.bits, qw.group_size,
                           qw.sym, cpu(qw.bias), qw.act_bits)


def _rtn_reference(linears: dict[str, nn.Module], qargs: QuantArgs) -> dict[str, torch.Tensor]:
    """Swap RTN weights into the Linears; returns the original weights to restore."""
    saved = {}
    with torch.no_grad():
        for name, lin in linears.items():
            saved[name] = lin.weight.detach().clone()
            lin.weight.copy_(rtn_quantize(lin.weight.float(), qargs).dequantize(lin.weight.dtype))
    return saved


def _restore(linears: dict[str, nn.Module], saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, w in saved.items():
            linears[name].weight.copy_(w)


@dataclass(slots=True)
class _LayerWork:
    """One decoder layer as both strategies see it."""

    index: int
    layer: nn.Module
    linears: dict[str, nn.Module]  # target Linears by name relative to the layer
    owner: dict[str, str]  # Linear → the Linear whose collector (input) it shares
    plan: LayerPlan  # the registry's shared inputs and scale groups of this layer
    n_check: int  # leading batches on which the output error is measured
    last: bool  # nothing reads this layer's outputs but the check


@torch.no_grad()
def quantize_model(model, input_ids: torch.Tensor, method: str, qargs: QuantArgs, is_target: Callable[[str], bool],
                   device: torch.device, progress: ProgressFn | None = None, batch_size: int = 4,
                   staged: bool | None = None, calib_dtype: torch.dtype | None = None) -> PipelineResult:
    """Quantize every targeted Linear of `model` (on the CPU, modified in place) layer by layer on `device`.

    input_ids [N, L] calibration windows. Returns the codes of every quantized Linear by full module name.
    staged: None = GPTQ in sublayer-sequential passes where the layer is Llama-shaped; False = the generic
    two-pass strategy everywhere (tests compare the two). calib_dtype: see LayerQuantizer.
    """
    t_start = time.perf_counter()
    decoder, layers, prefix = decoder_layers(model)
    config = model.config
    if method in registry.SCALE_METHODS:
        registry.require(config)
    known = registry.family(config) is not None
    n, seq_len = input_ids.shape
    batches = capture_inputs(model, input_ids, batch_size, device)
    n_check = max(1, math.ceil(min(n, max(1, CHECK_TOKENS // seq_len)) / batch_size))  # batches checked
    lq = LayerQuantizer(method, qargs, config, n * seq_len, calib_dtype)
    head = model.get_output_embeddings()
    head_name = next((nm for nm, m in model.named_modules() if m is head), None)
    quant_head = head_name is not None and is_target(head_name)
    total = len(layers) + int(quant_head)
    use_staged = staged is not False and known and method == "gptq"
    qweights: dict[str, QuantizedWeight] = {}
    reports: list[LayerReport] = []
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        layer.to(device)
        lp = f"{prefix}.{i}."
        linears = {nm: m for nm, m in layer.named_modules() if isinstance(m, nn.Linear) and is_target(lp + nm)}
        plan = registry.layer_plan(layer, config)
        work = _LayerWork(i, layer, linears, _owners(list(linears), plan), plan, n_check,
                          last=i == len(layers) - 1 and not quant_head)
        if use_staged and i == 0:
            use_staged = _SublayerStages.fits(layer, batches[0])
        strategy = _staged_layer if use_staged and not moe.moe_blocks(layer, config) else _two_pass_layer
        with lq.forwards(device):
            qw, detail, error, rtn_error = strategy(work, batches, lq)
        qweights.update({lp + nm: w for nm, w in qw.items()})
        if device.type != "cpu":
            layer.to("cpu")  # only one layer on the device at a time
        reports.append(LayerReport(f"layer {i}", error, rtn_error, time.perf_counter() - t0, detail))
        if progress:
            progress(i + 1, total)

    if quant_head:
        t0 = time.perf_counter()
        qweights[head_name], report = _quantize_head(model, decoder, head, head_name, batches, lq, n_check, device)
        reports.append(report)
        report.seconds = time.perf_counter() - t0
        if progress:
            progress(total, total)
    if device.type != "cpu":
        model.to("cpu")
    return PipelineResult(qweights, reports, time.perf_counter() - t_start)


def _rtn_error(work: _LayerWork, batches, float_out: list[torch.Tensor], lq: LayerQuantizer) -> float:
    """Relative output error of the same layer with RTN weights on the check batches (the reference column)."""
    meter = _ErrorMeter()
    saved = _rtn_reference(work.linears, lq.qargs)
    with act_quant_hooks(work.linears) if lq.act_bits else contextlib.nullcontext():
        for (x, kw), ref in zip(batches, float_out, strict=False):
            meter.add(_layer_out(work.layer(x, **kw)), ref)
    _restore(work.linears, saved)
    return meter.value


def _two_pass_layer(work: _LayerWork, batches, lq: LayerQuantizer
                    ) -> tuple[dict[str, QuantizedWeight], dict, float, float]:
    """Any decoder layer: one float forward gathers every collector's input, all groups are quantized, one
    quantized forward produces the next layer's inputs. Returns (codes, detail, error, RTN error)."""
    layer, linears, owner, n_check = work.layer, work.linears, work.owner, work.n_check
    device = batches[0][0].device
    stats = {nm: lq.collector(linears[nm].in_features, device) for nm in dict.fromkeys(owner.values())}
    collect = {nm: linears[nm] for nm, st in stats.items() if st is not None}
    float_out: list[torch.Tensor] = []
    order: list[str] = []  # collectors in call order, learned on the first (checked, full) batch

    def gather(nm: str, x: torch.Tensor) -> None:
        with _exact(device):
            stats[nm].add(x)
        if nm not in order:
            order.append(nm)

    float_next = lq.float_inputs and not work.last
    next_inputs: list[torch.Tensor] = []  # float_next: outputs of the unchecked batches
    # MoE: every expert sees every token here (statistics), the outputs keep the true routing
    with _hooks(collect, gather), moe.routing_calibration(layer, lq.config) as routing:
        for b, (x, kw) in enumerate(batches[:n_check]):
            float_out.append(_layer_out(layer(x, **kw)))
            _check_finite(float_out[-1], f"decoder layer {work.index}")
        if float_next:  # the next layer calibrates on this float layer's outputs (set once the checks are done)
            for x, kw in batches[n_check:]:
                next_inputs.append(_layer_out(layer(x, **kw)))
                _check_finite(next_inputs[-1], f"decoder layer {work.index}")
        elif collect and len(batches) > n_check:
            # past the checked batches only the collectors' inputs matter: stop the forward right after
            # the last collector has seen its input (Llama: skips down_proj's matmul and the residual)
            with _hooks({order[-1]: collect[order[-1]]}, _stop):
                for x, kw in batches[n_check:]:
                    with contextlib.suppress(_Stop):
                        layer(x, **kw)
    rtn_error = _rtn_error(work, batches, float_out, lq) if lq.method != "rtn" else None  # RTN: itself

    codes: dict[str, QuantizedWeight] = {}
    detail: dict = {}
    if routing is not None:
        detail["moe"] = routing.report(getattr(lq.config, "num_experts_per_tok", None), bool(collect))
    for own, st in stats.items():
        names = [nm for nm in linears if owner[nm] == own]
        with _exact(device):
            qw, d = lq.quantize_group(layer, names, linears, st, codes, work.plan)
        codes.update(qw)
        detail.update(d)
    stats.clear()  # free Hessians before the next layer

    meter = _ErrorMeter()
    with act_quant_hooks(linears) if lq.act_bits else contextlib.nullcontext():
        for b, (x, kw) in enumerate(batches[:n_check] if work.last or float_next else batches):
            y = _layer_out(layer(x, **kw))
            _check_finite(y, f"quantized decoder layer {work.index}")
            if b < n_check:
                meter.add(y, float_out[b])
            if not float_next:
                batches[b] = (y, kw)
    if float_next:
        for b, y in enumerate(float_out + next_inputs):
            batches[b] = (y, batches[b][1])
    return codes, detail, meter.value, meter.value if rtn_error is None else rtn_error


class _SublayerStages:
    """A Llama-style decoder layer cut at the inputs of its Linear groups:
        x → input_layernorm → [q k v] → attention → [o] → + x = h → post_attention_layernorm → [gate up]
          → act(gate)·up → [down] → + h = y
    Each piece is the layer's own module, so the float function is the layer's (checked on real inputs)."""

    GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    @classmethod
    def fits(cls, layer: nn.Module, batch: tuple[torch.Tensor, dict]) -> bool:
        """Has the parts, and the staged float forward equals layer(x) on a calibration batch."""
        names = {nm for nm, _ in layer.named_modules()}
        if not {"input_layernorm", "post_attention_layernorm", *(n for g in cls.GROUPS for n in g)} <= names:
            return False
        x, kw = batch
        stages = cls(layer)
        ref = _layer_out(layer(x, **kw))
        h = x + layer.self_attn.o_proj(stages.o_input(x, kw))
        y = h + layer.mlp.down_proj(stages.down_input(h))
        return bool((y - ref).float().norm() <= 1e-3 * ref.float().norm())

    def qkv_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.input_layernorm(x)

    def o_input(self, x: torch.Tensor, kw: dict) -> torch.Tensor:
        """Attention output before o_proj [B, L, heads·head_dim]."""
        return self._capture(self.layer.self_attn.o_proj,
                             lambda: self.layer.self_attn(hidden_states=self.qkv_input(x), **kw))

    def gate_up_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer.post_attention_layernorm(h)

    def down_input(self, h: torch.Tensor) -> torch.Tensor:
        """act(gate(·))·up(·) [B, L, intermediate]."""
        return self._capture(self.layer.mlp.down_proj, lambda: self.layer.mlp(self.gate_up_input(h)))

    @staticmethod
    def _capture(mod: nn.Module, run: Callable[[], object]) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def grab(_n: str, x: torch.Tensor) -> None:
            seen.append(x)
            raise _Stop

        with _hooks({"": mod}, grab), contextlib.suppress(_Stop):
            run()
        return seen[0]


KEEP_MLP_BYTES = 1 << 30  # keep down_proj's inputs between its statistics and its forward up to this size


def _staged_layer(work: _LayerWork, batches, lq: LayerQuantizer
                  ) -> tuple[dict[str, QuantizedWeight], dict, float, float]:
    """GPTQ, true-sequential inside the layer: each Linear group's Hessian is gathered on inputs that already
    went through the quantized groups before it, and every piece of the layer runs once per batch (the two-pass
    strategy runs the layer twice). Kept per batch between pieces: the attention output, h, and down_proj's
    input while it fits KEEP_MLP_BYTES (else recomputed). Returns (codes, detail, error, RTN error)."""
    layer, linears, owner, n_check = work.layer, work.linears, work.owner, work.n_check
    device = batches[0][0].device
    float_out = [_layer_out(layer(x, **kw)) for x, kw in batches[:n_check]]
    for y in float_out:
        _check_finite(y, f"decoder layer {work.index}")
    rtn_error = _rtn_error(work, batches, float_out, lq)
    stages = _SublayerStages(layer)
    codes: dict[str, QuantizedWeight] = {}

    def calibrate(group: tuple[str, ...], inputs: Iterator[torch.Tensor]) -> None:
        """Feed every batch's input of this group to its collector, then quantize the group."""
        names = [nm for nm in group if nm in linears]
        st = lq.collector(linears[owner[names[0]]].in_features, device) if names else None
        for x in inputs:  # walked even without targets: the caller keeps what the generator produces
            if st is not None:
                with _exact(device):
                    st.add(x)
        if st is not None:
            with _exact(device):
                codes.update(lq.quantize_group(layer, [nm for nm in linears if owner[nm] == owner[names[0]]],
                                               linears, st, codes, work.plan)[0])

    g_qkv, g_o, g_gu, g_down = _SublayerStages.GROUPS
    calibrate(g_qkv, (stages.qkv_input(x) for x, _ in batches))
    zs: list[torch.Tensor | None] = []
    calibrate(g_o, (zs.append(stages.o_input(x, kw)) or zs[-1] for x, kw in batches))
    hs: list[torch.Tensor] = []
    for b, z in enumerate(zs):
        zs[b] = None  # free as we go
        hs.append(batches[b][0] + layer.self_attn.o_proj(z))
    calibrate(g_gu, (stages.gate_up_input(h) for h in hs))
    tokens = sum(h.numel() for h in hs) // hs[0].shape[-1]
    keep = tokens * layer.mlp.down_proj.in_features * hs[0].element_size() <= KEEP_MLP_BYTES
    us: list[torch.Tensor] = []
    calibrate(g_down, ((us.append(u) if keep else None) or u for u in map(stages.down_input, hs)))
    meter = _ErrorMeter()
    for b, h in enumerate(hs[:n_check] if work.last else hs):
        y = h + layer.mlp.down_proj(us[b] if keep else stages.down_input(h))
        _check_finite(y, f"quantized decoder layer {work.index}")
        if b < n_check:
            meter.add(y, float_out[b])
        batches[b] = (y, batches[b][1])
    return codes, {}, meter.value, rtn_error


def _exact(device: torch.device):
    """Statistics, solves and folds run in fp32 whatever the forwards' autocast."""
    return torch.autocast(device.type, enabled=False)


def _quantize_head(model, decoder, head: nn.Linear, head_name: str, batches, lq: LayerQuantizer, n_check: int,
                   device: torch.device) -> tuple[QuantizedWeight, LayerReport]:
    """Quantize the output projection from the final-norm outputs (no scale folding: nothing precedes it but
    the norm shared with nothing else, and a tied embedding is untied first so it stays float)."""
    emb = model.get_input_embeddings()
    if emb is not None and emb.weight is head.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    head.to(device)
    norm = registry.final_norm(model)
    if norm is None:
        raise LlmoptError(f"cannot quantize {head_name}: the norm before it is unknown for "
                          f"{getattr(model.config, 'model_type', '')!r} (not in llmopt's family registry)")
    st = lq.collector(head.in_features, device)
    xs = [norm(x) for x, _ in batches]  # [B, L, H] each
    if st is not None:
        for x in xs:
            st.add(x)
    check = [x[:, : max(1, CHECK_TOKENS // (8 * x.shape[0]))] for x in xs[:1]]  # logits are big: few tokens
    ref = [head(x) for x in check]
    rtn_meter, meter = _ErrorMeter(), _ErrorMeter()
    linears = {"": head}
    saved = _rtn_reference(linears, lq.qargs)
    with act_quant_hooks(linears) if lq.act_bits else contextlib.nullcontext():
        for x, r in zip(check, ref, strict=True):
            rtn_meter.add(head(x), r)
    _restore(linears, saved)
    qw, _ = lq.quantize_group(head, [""], linears, st, {}, None)
    with act_quant_hooks(linears) if lq.act_bits else contextlib.nullcontext():
        for x, r in zip(check, ref, strict=True):
            meter.add(head(x), r)
    if lq.method == "rtn":
        rtn_meter = meter
    if device.type != "cpu":
        head.to("cpu")
    return qw[""], LayerReport(head_name, meter.value, rtn_meter.value, 0.0)
