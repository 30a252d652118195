"""The layer walk: layer-by-layer sequential calibration, the stateful part of quantization.

The model sits on the CPU; one decoder layer at a time moves to the device. Per layer:
  1. the built-in check: the float layer and the same layer with RTN weights on the check batches;
  2. calibration, by the method object's flags (quant/methods.py):
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import nn

from llmopt.checkpoint.types import QuantArgs, QuantizedWeight
from llmopt.errors import LlmoptError
from llmopt.families import moe, registry
from llmopt.families.registry import LayerPlan, ScaleGroup, fold_scales
from llmopt.memory import return_freed_memory
from llmopt.progress import Progress, emit
from llmopt.quant.methods import METHODS, Method
from llmopt.quant.reference import ErrorMeter, act_quant, input_hooks, rtn_error

CHECK_TOKENS = 1024  # calibration tokens on which each layer's output error is measured
KEEP_MLP_BYTES = 1 << 30  # keep down_proj's inputs between its statistics and its forward up to this size

Batch = tuple[torch.Tensor, dict]  # a decoder layer's input: hidden [B, L, H] and its keyword arguments


@dataclass(slots=True)
class LayerReport:
    """Built-in check of one decoder layer (or the lm_head): relative output error on the check samples."""

    name: str
    error: float | None  # ‖Y_method − Y_float‖ / ‖Y_float‖ (None: not checked, a data-free run without the check)
    rtn_error: float | None  # same for RTN at the same bits/group/sym
    seconds: float
    detail: dict = field(default_factory=dict)  # e.g. AWQ's α per scale group

    @property
    def vs_rtn(self) -> float | None:
        if self.error is None or self.rtn_error is None:
            return None
        return self.error / self.rtn_error if self.rtn_error > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "vs_rtn": self.vs_rtn}


@dataclass(slots=True)
class WalkResult:
    qweights: dict[str, QuantizedWeight]  # codes by full module name
    layers: list[LayerReport]
    seconds: float


@dataclass(slots=True)
class LayerOutcome:
    """What a layer strategy produced: the codes (names relative to the layer) and the layer's check."""

    codes: dict[str, QuantizedWeight]
    detail: dict
    error: float
    rtn_error: float


@dataclass(slots=True)
class LayerWork:
    """One decoder layer as both strategies see it."""

    index: int
    layer: nn.Module
    linears: dict[str, nn.Module]  # target Linears by name relative to the layer
    input_leader: dict[str, str]  # Linear → the first Linear reading the same input (whose collector it shares)
    plan: LayerPlan  # the registry's shared inputs and scale groups of this layer
    n_check: int  # leading batches on which the output error is measured
    last: bool  # nothing reads this layer's outputs but the check
    config: object  # the model's config (MoE routing)

    def readers(self, leader: str) -> list[str]:
        """The target Linears sharing `leader`'s input, in module order."""
        return [name for name in self.linears if self.input_leader[name] == leader]


class PartSource(Protocol):
    """Where the walk's parts come from when the model is not in memory (quant/streamed.py): each decoder layer
    (and the head) is loaded just before the walk needs it, and written and dropped when it is done."""

    def before_capture(self) -> None: ...  # embeddings and the other small parts the first layer's inputs need

    def after_capture(self) -> None: ...  # the embeddings are no longer needed

    def load(self, name: str) -> None: ...  # the module `name` (a decoder layer, the head) in memory

    def done(self, name: str, codes: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
        """Write the module and its codes (full names), drop its tensors; returns what the walk keeps (the codes'
        names and settings)."""
        ...


class _Stop(Exception):
    """Raised by a hook to stop a forward pass once what it needed has been seen."""


def decoder_layers(model) -> tuple[nn.Module, nn.ModuleList, str]:
    """(decoder, its layers, the layers' module name) of a transformers causal LM (families/registry.py)."""
    return registry.decoder_layers(model)


def check_finite_weights(model) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise LlmoptError(f"weight {name} contains NaN or Inf: the checkpoint is corrupt; quantize a valid one")


def layer_out(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _check_finite(y: torch.Tensor, where: str) -> None:
    if not torch.isfinite(y).all():
        raise LlmoptError(f"NaN or Inf in the activations of {where}: the model overflows on the calibration data "
                          f"(try --dtype float32 or other calibration text)")


@torch.no_grad()
def capture_inputs(model, input_ids: torch.Tensor, batch_size: int, device: torch.device) -> list[Batch]:
    """Inputs of the first decoder layer for each calibration batch: (hidden [B, L, H], layer kwargs)."""
    decoder, layers, _ = decoder_layers(model)
    for child in decoder.children():
        if child is not layers:  # embeddings, rotary tables, final norm: small, kept on the device
            child.to(device)
    captured: list[Batch] = []

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


def _stop(_name: str, _x: torch.Tensor) -> None:
    raise _Stop


def input_leaders(names: list[str], plan: LayerPlan) -> dict[str, str]:
    """Linear name → name of the Linear whose collector it shares (itself unless a sibling reads the same input:
    the registry's shared-input groups, which include every expert of an MoE block under calibrate_all)."""
    leader = {n: n for n in names}
    present = set(names)
    for group in plan.inputs:
        members = [m for m in group if m in present]
        for m in members[1:]:
            leader[m] = members[0]
    return leader


def _exact(device: torch.device):
    """Statistics, solves and folds run in fp32 whatever the forwards' autocast."""
    return torch.autocast(device.type, enabled=False)


def _forwards(device: torch.device, calib_dtype: torch.dtype | None):
    """Context for the layer forwards: autocast to calib_dtype (weights stay fp32), else nothing."""
    if calib_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=calib_dtype, cache_enabled=False)  # no cache: weights change


@torch.no_grad()
def quantize_group(method: Method, layer: nn.Module, names: list[str], linears: dict[str, nn.Module], stat,
                   done: dict[str, QuantizedWeight], plan: LayerPlan | None, write_back: bool = True
                   ) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize the target Linears `names` that read one input (stat: its collector; None when data-free),
    in place (dequantized weights written back). A scale-folding method first folds its per-input-channel scales
    s into the op before; when that op is a Linear of this layer already quantized (in `done`), its codes stay
    and only its row scales (and bias) are divided by s. Returns (codes, detail)."""
    detail: dict = {}
    folded = None
    group = _scale_group(plan, names[0]) if method.folds_scales and plan is not None else None
    if group is not None:
        folded, detail = method.scales(layer, group, names, linears, stat)
        fold_scales(layer, group, folded)
        if group.prev in done:  # rows of a quantized Linear / s: same codes, scales / s
            _divide_rows(done[group.prev], group, folded)
    codes = method.quantize(names, linears, stat, folded)
    for name, qw in codes.items():
        lin = linears[name]
        qw.bias = None if lin.bias is None else lin.bias.detach().clone()
        if write_back:  # the quantized forwards that follow run on these (write_back=False: nothing follows)
            lin.weight.copy_(qw.dequantize(lin.weight.dtype))
        codes[name] = _to_cpu(qw)  # codes wait for the writer in host memory, not on the device
    return_freed_memory()  # the statistics and solver temporaries just freed (memory.py: heap fragmentation)
    return codes, detail


def _scale_group(plan: LayerPlan, first: str) -> ScaleGroup | None:
    """The foldable group whose Linears include `first` (None: nothing precedes it that can take a scale)."""
    return next((g for g in plan.scales if first in g.linears), None)


def _divide_rows(qw: QuantizedWeight, group: ScaleGroup, s: torch.Tensor) -> None:
    """The producer of a fold is a Linear already quantized: its (group's) output rows / s keep the codes and
    divide the row scales (and bias) instead."""
    rows = slice(None) if group.rows is None else group.rows.to(qw.scales.device)
    s_rows = s.to(device=qw.scales.device, dtype=qw.scales.dtype)
    scales = qw.scales.clone()  # [out, G]
    scales[rows] = scales[rows] / s_rows.unsqueeze(1)
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


@dataclass(slots=True)
class _WalkPlan:
    """What the walk decided before the first layer."""

    method: Method
    batches: list[Batch]
    n_check: int
    head: nn.Linear | None  # the output projection when it is a target
    head_name: str | None
    staged: bool  # GPTQ true-sequential inside Llama-shaped layers (decided on layer 0)
    calib_dtype: torch.dtype | None
    device: torch.device


def targeted_head(model, is_target: Callable[[str], bool]) -> tuple[nn.Module | None, str | None]:
    """The output head and its module name when the targets name it (lm_head is quantized only when named),
    else (None, None)."""
    head = model.get_output_embeddings()
    name = next((nm for nm, m in model.named_modules() if m is head), None)
    return (head, name) if name is not None and is_target(name) else (None, None)


def _plan_walk(model, input_ids: torch.Tensor, method_name: str, qargs: QuantArgs, is_target: Callable[[str], bool],
               device: torch.device, batch_size: int, staged: bool | None,
               calib_dtype: torch.dtype | None, source: PartSource | None) -> _WalkPlan:
    method = METHODS[method_name](qargs, input_ids.numel())
    if method.folds_scales:
        registry.require(model.config)
    n, seq_len = input_ids.shape
    if source is not None:
        source.before_capture()
    batches = capture_inputs(model, input_ids, batch_size, device)
    if source is not None:
        source.after_capture()
    n_check = max(1, math.ceil(min(n, max(1, CHECK_TOKENS // seq_len)) / batch_size))  # batches checked
    head, head_name = targeted_head(model, is_target)
    use_staged = staged is not False and registry.family(model.config) is not None and method.sequential_within_layer
    return _WalkPlan(method, batches, n_check, head, head_name, use_staged, calib_dtype, device)


@torch.no_grad()
def quantize_model(model, input_ids: torch.Tensor, method: str, qargs: QuantArgs, is_target: Callable[[str], bool],
                   device: torch.device, progress: Progress | None = None, batch_size: int = 4,
                   staged: bool | None = None, calib_dtype: torch.dtype | None = None,
                   source: PartSource | None = None) -> WalkResult:
    """Quantize every targeted Linear of `model` (on the CPU, modified in place) layer by layer on `device`.

    input_ids [N, L] calibration windows. Returns the codes of every quantized Linear by full module name.
    staged: None = GPTQ in sublayer-sequential passes where the layer is Llama-shaped; False = the generic
    two-pass strategy everywhere (tests compare the two). calib_dtype: autocast dtype of the layer forwards
    (statistics and solves stay fp32). progress: one Event per layer, task "<method> layer". source: the
    model's parts stream from disk (None: the model is in memory).
    """
    t_start = time.perf_counter()
    _, layers, prefix = decoder_layers(model)
    walk = _plan_walk(model, input_ids, method, qargs, is_target, device, batch_size, staged, calib_dtype, source)
    total = len(layers) + int(walk.head is not None)
    task = f"{method} layer"
    qweights: dict[str, QuantizedWeight] = {}
    reports: list[LayerReport] = []
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        if source is not None:
            source.load(f"{prefix}.{i}")
        outcome = _quantize_layer(model, walk, i, layer, f"{prefix}.{i}.", is_target,
                                  last=i == len(layers) - 1 and walk.head is None)
        codes = {f"{prefix}.{i}.{nm}": w for nm, w in outcome.codes.items()}
        qweights.update(codes if source is None else source.done(f"{prefix}.{i}", codes))
        reports.append(LayerReport(f"layer {i}", outcome.error, outcome.rtn_error, time.perf_counter() - t0,
                                   outcome.detail))
        emit(progress, task, i + 1, total)
    if walk.head is not None:
        t0 = time.perf_counter()
        if source is not None:
            source.load(walk.head_name)
        code, report = _quantize_head(model, walk)
        codes = {walk.head_name: code}
        qweights.update(codes if source is None else source.done(walk.head_name, codes))
        report.seconds = time.perf_counter() - t0
        reports.append(report)
        emit(progress, task, total, total)
    _back_to_cpu(model, device)
    return WalkResult(qweights, reports, time.perf_counter() - t_start)


@torch.no_grad()
def quantize_data_free(model, method: str, qargs: QuantArgs, is_target: Callable[[str], bool], device: torch.device,
                       progress: Progress | None = None, source: PartSource | None = None,
                       write_back: bool = False) -> WalkResult:
    """RTN / INT8 weight-only without the per-layer check: no calibration data, no forwards; each targeted
    Linear's codes straight from its weights, layer by layer on `device` (same codes as quantize_model's).
    write_back: the dequantized weights replace the float ones (a streamed evaluation runs on them)."""
    t_start = time.perf_counter()
    _, layers, prefix = decoder_layers(model)
    quantizer = METHODS[method](qargs, 0)
    head, head_name = targeted_head(model, is_target)
    parts = [(f"{prefix}.{i}", f"layer {i}") for i in range(len(layers))]
    if head_name is not None:
        parts.append((head_name, head_name))
    if source is not None:  # nothing to capture, but the source writes the embeddings (and evaluates) here
        source.before_capture()
        source.after_capture()
    qweights: dict[str, QuantizedWeight] = {}
    reports: list[LayerReport] = []
    for k, (name, label) in enumerate(parts):
        t0 = time.perf_counter()
        if source is not None:
            source.load(name)
        if name == head_name:
            _untie_head(model, head)
        module = model.get_submodule(name).to(device)
        linears = {nm: m for nm, m in module.named_modules() if isinstance(m, nn.Linear)
                   and is_target(f"{name}.{nm}" if nm else name)}
        codes: dict[str, QuantizedWeight] = {}
        for nm in linears:
            codes.update(quantize_group(quantizer, module, [nm], linears, None, codes, None, write_back)[0])
        if device.type != "cpu":
            module.to("cpu")
        codes = {f"{name}.{nm}" if nm else name: w for nm, w in codes.items()}
        qweights.update(codes if source is None else source.done(name, codes))
        reports.append(LayerReport(label, None, None, time.perf_counter() - t0))
        emit(progress, f"{method} layer", k + 1, len(parts))
    return WalkResult(qweights, reports, time.perf_counter() - t_start)


def _back_to_cpu(model, device: torch.device) -> None:
    """Everything the walk moved to the device back on the CPU (a streamed model's empty parts stay meta)."""
    if device.type != "cpu":
        model._apply(lambda t: t if t.is_meta else t.cpu())


def _untie_head(model, head: nn.Linear) -> None:
    """A head tied to the embedding gets its own copy before it is quantized: the embedding stays float."""
    emb = model.get_input_embeddings()
    if emb is not None and emb.weight is head.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False


def _quantize_layer(model, walk: _WalkPlan, index: int, layer: nn.Module, prefix: str,
                    is_target: Callable[[str], bool], last: bool) -> LayerOutcome:
    """One decoder layer on the device, by the strategy that fits it; back on the CPU after."""
    layer.to(walk.device)
    linears = {nm: m for nm, m in layer.named_modules() if isinstance(m, nn.Linear) and is_target(prefix + nm)}
    plan = registry.layer_plan(layer, model.config)
    work = LayerWork(index, layer, linears, input_leaders(list(linears), plan), plan, walk.n_check, last, model.config)
    if walk.staged and index == 0:
        walk.staged = SublayerStages.fits(layer, walk.batches[0])
    strategy = _staged_layer if walk.staged and not moe.moe_blocks(layer, model.config) else _two_pass_layer
    with _forwards(walk.device, walk.calib_dtype):
        outcome = strategy(work, walk.batches, walk.method)
    if walk.device.type != "cpu":
        layer.to("cpu")  # only one layer on the device at a time
    return outcome


def _layer_rtn_error(work: LayerWork, batches: list[Batch], float_out: list[torch.Tensor], method: Method) -> float:
    """Relative output error of the same layer with RTN weights on the check batches (the reference column)."""
    pairs = [(lambda x=x, kw=kw: layer_out(work.layer(x, **kw)), ref)
             for (x, kw), ref in zip(batches, float_out, strict=False)]
    return rtn_error(work.linears, method.qargs, method.act_bits, pairs)


@dataclass(slots=True)
class _FloatPass:
    """The statistics pass of the two-pass strategy."""

    stats: dict[str, object]  # input leader → its collector (None: data-free)
    float_out: list[torch.Tensor]  # float outputs of the checked batches
    next_inputs: list[torch.Tensor]  # float_inputs methods: float outputs of the unchecked batches
    routing: object | None  # MoE: tokens routed per expert (moe.routing_calibration)


def _two_pass_layer(work: LayerWork, batches: list[Batch], method: Method) -> LayerOutcome:
    """Any decoder layer: one float forward gathers every collector's input, all groups are quantized, one
    quantized forward produces the next layer's inputs."""
    float_next = method.float_inputs and not work.last
    gathered = _statistics_pass(work, batches, method, float_next)
    reference = None if method.is_reference else _layer_rtn_error(work, batches, gathered.float_out, method)
    detail: dict = {}
    if gathered.routing is not None:
        collecting = any(stat is not None for stat in gathered.stats.values())
        detail["moe"] = gathered.routing.report(getattr(work.config, "num_experts_per_tok", None), collecting)
    codes = _quantize_groups(work, gathered.stats, method, batches[0][0].device, detail)
    gathered.stats.clear()  # free Hessians before the next layer
    error = _quantized_pass(work, batches, method, gathered, float_next)
    return LayerOutcome(codes, detail, error, error if reference is None else reference)


def _statistics_pass(work: LayerWork, batches: list[Batch], method: Method, float_next: bool) -> _FloatPass:
    """The float forward: every collector sees its input; the checked batches' float outputs are kept."""
    layer, linears = work.layer, work.linears
    device = batches[0][0].device
    stats = {nm: method.collector(linears[nm].in_features, device) for nm in dict.fromkeys(work.input_leader.values())}
    collect = {nm: linears[nm] for nm, stat in stats.items() if stat is not None}
    gathered = _FloatPass(stats, [], [], None)
    order: list[str] = []  # collectors in call order, learned on the first (checked, full) batch

    def gather(nm: str, x: torch.Tensor) -> None:
        with _exact(device):
            stats[nm].add(x)
        if nm not in order:
            order.append(nm)

    # MoE: every expert sees every token here (statistics), the outputs keep the true routing
    with input_hooks(collect, gather), moe.routing_calibration(layer, work.config) as routing:
        gathered.routing = routing
        for x, kw in batches[: work.n_check]:
            gathered.float_out.append(layer_out(layer(x, **kw)))
            _check_finite(gathered.float_out[-1], f"decoder layer {work.index}")
        if float_next:  # the next layer calibrates on this float layer's outputs (set once the checks are done)
            for x, kw in batches[work.n_check:]:
                gathered.next_inputs.append(layer_out(layer(x, **kw)))
                _check_finite(gathered.next_inputs[-1], f"decoder layer {work.index}")
        elif collect and len(batches) > work.n_check:
            # past the checked batches only the collectors' inputs matter: stop the forward right after
            # the last collector has seen its input (Llama: skips down_proj's matmul and the residual)
            with input_hooks({order[-1]: collect[order[-1]]}, _stop):
                for x, kw in batches[work.n_check:]:
                    with contextlib.suppress(_Stop):
                        layer(x, **kw)
    return gathered


def _quantize_groups(work: LayerWork, stats: dict[str, object], method: Method, device: torch.device,
                     detail: dict) -> dict[str, QuantizedWeight]:
    """Every shared-input group of the layer in order, from its collector; detail gets the methods' reports."""
    codes: dict[str, QuantizedWeight] = {}
    for leader, stat in stats.items():
        with _exact(device):
            group_codes, group_detail = quantize_group(method, work.layer, work.readers(leader), work.linears, stat,
                                                       codes, work.plan)
        codes.update(group_codes)
        detail.update(group_detail)
    return codes


def _quantized_pass(work: LayerWork, batches: list[Batch], method: Method, gathered: _FloatPass,
                    float_next: bool) -> float:
    """The quantized forward: the layer's check, and (unless float_next) the next layer's inputs in `batches`."""
    meter = ErrorMeter()
    n_check = work.n_check
    with act_quant(work.linears, method.act_bits):
        for b, (x, kw) in enumerate(batches[:n_check] if work.last or float_next else batches):
            y = layer_out(work.layer(x, **kw))
            _check_finite(y, f"quantized decoder layer {work.index}")
            if b < n_check:
                meter.add(y, gathered.float_out[b])
            if not float_next:
                batches[b] = (y, kw)
    if float_next:
        for b, y in enumerate(gathered.float_out + gathered.next_inputs):
            batches[b] = (y, batches[b][1])
    return meter.value


class SublayerStages:
    """A Llama-style decoder layer cut at the inputs of its Linear groups:
        x → input_layernorm → [q k v] → attention → [o] → + x = h → post_attention_layernorm → [gate up]
          → act(gate)·up → [down] → + h = y
    Each piece is the layer's own module, so the float function is the layer's (checked on real inputs)."""

    GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    @classmethod
    def fits(cls, layer: nn.Module, batch: Batch) -> bool:
        """Has the parts, and the staged float forward equals layer(x) on a calibration batch."""
        names = {nm for nm, _ in layer.named_modules()}
        if not {"input_layernorm", "post_attention_layernorm", *(n for g in cls.GROUPS for n in g)} <= names:
            return False
        x, kw = batch
        stages = cls(layer)
        ref = layer_out(layer(x, **kw))
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

        with input_hooks({"": mod}, grab), contextlib.suppress(_Stop):
            run()
        return seen[0]


class _GroupCalibrator:
    """The staged strategy's step: feed one Linear group's input, batch by batch, then quantize the group."""

    def __init__(self, work: LayerWork, method: Method, device: torch.device) -> None:
        self.work, self.method, self.device = work, method, device
        self.codes: dict[str, QuantizedWeight] = {}
        self.stat = None
        self.leader: str | None = None

    def start(self, group: tuple[str, ...]) -> None:
        names = [nm for nm in group if nm in self.work.linears]
        self.leader = self.work.input_leader[names[0]] if names else None
        self.stat = None if self.leader is None else self.method.collector(
            self.work.linears[self.leader].in_features, self.device)

    def add(self, x: torch.Tensor) -> torch.Tensor:
        if self.stat is not None:
            with _exact(self.device):
                self.stat.add(x)
        return x

    def finish(self) -> None:
        if self.stat is not None:
            with _exact(self.device):
                group_codes, _ = quantize_group(self.method, self.work.layer, self.work.readers(self.leader),
                                                self.work.linears, self.stat, self.codes, self.work.plan)
            self.codes.update(group_codes)
        self.stat = None


def _staged_layer(work: LayerWork, batches: list[Batch], method: Method) -> LayerOutcome:
    """GPTQ, true-sequential inside the layer: each Linear group's Hessian is gathered on inputs that already
    went through the quantized groups before it, and every piece of the layer runs once per batch (the two-pass
    strategy runs the layer twice). Kept per batch between pieces: the attention output, h, and down_proj's
    input while it fits KEEP_MLP_BYTES (else recomputed)."""
    layer, n_check = work.layer, work.n_check
    float_out = [layer_out(layer(x, **kw)) for x, kw in batches[:n_check]]
    for y in float_out:
        _check_finite(y, f"decoder layer {work.index}")
    reference = _layer_rtn_error(work, batches, float_out, method)
    stages = SublayerStages(layer)
    calibrator = _GroupCalibrator(work, method, batches[0][0].device)
    qkv_group, o_group, gate_up_group, down_group = SublayerStages.GROUPS

    calibrator.start(qkv_group)
    for x, _ in batches:
        calibrator.add(stages.qkv_input(x))
    calibrator.finish()
    calibrator.start(o_group)
    attention_out: list[torch.Tensor | None] = [calibrator.add(stages.o_input(x, kw)) for x, kw in batches]
    calibrator.finish()
    residual: list[torch.Tensor] = []  # h = x + o_proj(attention) per batch [B, L, H]
    for b, attn in enumerate(attention_out):
        attention_out[b] = None  # free as we go
        residual.append(batches[b][0] + layer.self_attn.o_proj(attn))
    calibrator.start(gate_up_group)
    for h in residual:
        calibrator.add(stages.gate_up_input(h))
    calibrator.finish()
    error = _staged_mlp(work, batches, stages, calibrator, down_group, residual, float_out)
    return LayerOutcome(calibrator.codes, {}, error, reference)


def _staged_mlp(work: LayerWork, batches: list[Batch], stages: SublayerStages, calibrator: _GroupCalibrator,
                down_group: tuple[str, ...], residual: list[torch.Tensor], float_out: list[torch.Tensor]) -> float:
    """down_proj's group, then the layer outputs (the check, and the next layer's inputs in `batches`)."""
    down_proj = work.layer.mlp.down_proj
    tokens = sum(h.numel() for h in residual) // residual[0].shape[-1]
    keep = tokens * down_proj.in_features * residual[0].element_size() <= KEEP_MLP_BYTES
    down_inputs: list[torch.Tensor] = []  # [B, L, intermediate] per batch while they fit
    calibrator.start(down_group)
    for h in residual:
        u = calibrator.add(stages.down_input(h))
        if keep:
            down_inputs.append(u)
    calibrator.finish()
    meter = ErrorMeter()
    for b, h in enumerate(residual[: work.n_check] if work.last else residual):
        y = h + down_proj(down_inputs[b] if keep else stages.down_input(h))
        _check_finite(y, f"quantized decoder layer {work.index}")
        if b < work.n_check:
            meter.add(y, float_out[b])
        batches[b] = (y, batches[b][1])
    return meter.value


def _quantize_head(model, walk: _WalkPlan) -> tuple[QuantizedWeight, LayerReport]:
    """Quantize the output projection from the final-norm outputs (no scale folding: nothing precedes it but
    the norm shared with nothing else, and a tied embedding is untied first so it stays float)."""
    head, head_name, method, device = walk.head, walk.head_name, walk.method, walk.device
    _untie_head(model, head)
    head.to(device)
    norm = registry.final_norm(model)
    if norm is None:
        raise LlmoptError(f"cannot quantize {head_name}: the norm before it is unknown for "
                          f"{getattr(model.config, 'model_type', '')!r} (not in llmopt's family registry)")
    stat = method.collector(head.in_features, device)
    normed = [norm(x) for x, _ in walk.batches]  # [B, L, H] each
    if stat is not None:
        for x in normed:
            stat.add(x)
    check = [x[:, : max(1, CHECK_TOKENS // (8 * x.shape[0]))] for x in normed[:1]]  # logits are big: few tokens
    ref = [head(x) for x in check]
    linears = {"": head}
    reference = rtn_error(linears, method.qargs, method.act_bits,
                          [(lambda x=x: head(x), r) for x, r in zip(check, ref, strict=True)])
    codes, _ = quantize_group(method, head, [""], linears, stat, {}, None)
    meter = ErrorMeter()
    with act_quant(linears, method.act_bits):
        for x, r in zip(check, ref, strict=True):
            meter.add(head(x), r)
    if device.type != "cpu":
        head.to("cpu")
    return codes[""], LayerReport(head_name, meter.value, meter.value if method.is_reference else reference, 0.0)
