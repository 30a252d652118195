"""Layer-by-layer sequential calibration: the stateful part of quantization.

The model sits on the CPU; one decoder layer at a time moves to the device. For each layer:
  1. forward the layer's inputs (outputs of the already-quantized previous layers), hooks on its Linears
     gathering what the method needs (GPTQ Hessians, AWQ statistics, SmoothQuant activation maxima);
  2. the built-in check: the same layer with RTN weights on the check samples (error reference);
  3. run the method (fold scales, quantize each Linear, write the dequantized weight back);
  4. forward the quantized layer: its outputs are the next layer's inputs, and on the check samples
     its relative output error vs the float layer is recorded next to RTN's.
Linears reading the same tensor (q/k/v, gate/up) share one collector, so their Hessian is built once.
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
from llmopt.quant import awq as awq_mod
from llmopt.quant.gptq import HessianAccumulator, gptq_quantize
from llmopt.quant.mappings import SUPPORTED_MODEL_TYPES, fold_scales, scale_groups
from llmopt.quant.rtn import fake_quantize_activations, rtn_quantize
from llmopt.quant.smoothquant import ActMaxAccumulator, smooth_scales, w8a8_quantize
from llmopt.quant.types import QuantArgs, QuantizedWeight

CHECK_TOKENS = 4096  # calibration tokens on which each layer's output error is measured
# siblings that read the very same input tensor in Llama-style layers
_SHARED_INPUTS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))

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
    """(decoder, its layers, the layers' module name prefix) of a transformers causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise LlmoptError(f"{type(model).__name__} has no decoder `layers` list: llmopt quantize supports "
                          f"Llama-style causal LMs (Llama, Mistral, Qwen2/3, ...)")
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return decoder, layers, prefix


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
    for name, child in decoder.named_children():
        if name != "layers":  # embeddings, rotary tables, final norm: small, kept on the device
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


def _owners(names: list[str], shared: bool) -> dict[str, str]:
    """Linear name → name of the Linear whose collector it shares (itself unless a sibling reads the same input)."""
    owner = {n: n for n in names}
    if not shared:
        return owner
    present = set(names)
    for group in _SHARED_INPUTS:
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
    """Per-method part of the pipeline: what to collect, and how to quantize a layer from it."""

    def __init__(self, method: str, qargs: QuantArgs, config, total_tokens: int) -> None:
        self.method = method
        self.qargs = qargs
        self.config = config
        self.total_tokens = total_tokens
        self.act_bits = 8 if method == "w8a8" else None

    def collector(self, n_in: int, device: torch.device):
        if self.method == "gptq":
            return HessianAccumulator(n_in, device)
        if self.method == "awq":
            return awq_mod.AwqStats(n_in, self.qargs.group_size, self.total_tokens, device)
        if self.method == "w8a8":
            return ActMaxAccumulator(n_in, device)
        return None  # rtn, int8: data-free

    @torch.no_grad()
    def quantize_layer(self, layer: nn.Module, linears: dict[str, nn.Module], owner: dict[str, str],
                       stats: dict[str, object], is_decoder_layer: bool) -> tuple[dict[str, QuantizedWeight], dict]:
        """Quantize the layer's target Linears in place (dequantized weights written back); returns codes + detail."""
        detail: dict = {}
        in_scale: dict[str, torch.Tensor] = {}  # AWQ: per-input-channel scale folded into each Linear
        if self.method in ("awq", "w8a8") and is_decoder_layer:
            for group in scale_groups(layer, self.config):
                targets = [n for n in group.linears if n in linears]
                if not targets:
                    continue
                st = stats[owner[targets[0]]]
                weights = [layer.get_submodule(n).weight for n in group.linears]
                if self.method == "w8a8":
                    s = smooth_scales(st.amax, weights, self.qargs.smoothquant_alpha)
                else:
                    tw = [linears[n].weight for n in targets]
                    s, alpha, loss, rtn_loss = awq_mod.search_scales(st.tokens(), st.mean_abs(), tw, self.qargs)
                    detail[group.prev] = {"alpha": alpha, "loss_vs_rtn": loss / rtn_loss if rtn_loss > 0 else 1.0}
                fold_scales(layer, group, s)
                for n in group.linears:
                    in_scale[n] = s
        out = self._gptq_shared(linears, owner, stats) if self.method == "gptq" else {}
        for name, lin in linears.items():
            w = lin.weight.detach().float()  # [out, in]
            if name in out:
                qw = out[name]
            elif self.method == "awq":
                gram = stats[owner[name]].gram_blocks()  # [G, gs, gs] of the unscaled input
                if name in in_scale:  # the Linear now reads x / s
                    s = in_scale[name].view(gram.shape[0], -1)  # [G, gs]
                    gram = gram / (s.unsqueeze(2) * s.unsqueeze(1))
                qw = awq_mod.awq_quantize(w, gram, self.qargs)
            elif self.method == "w8a8":
                qw = w8a8_quantize(w, self.qargs)
            else:  # rtn, int8 (int8 = RTN at 8 bits per channel)
                qw = rtn_quantize(w, self.qargs)
            qw.bias = None if lin.bias is None else lin.bias.detach().clone()
            lin.weight.copy_(qw.dequantize(lin.weight.dtype))
            out[name] = _to_cpu(qw)  # codes wait for the writer in host memory, not on the device
        return out, detail

    def _gptq_shared(self, linears: dict[str, nn.Module], owner: dict[str, str], stats: dict[str, object]
                     ) -> dict[str, QuantizedWeight]:
        """GPTQ of Linears sharing an input as ONE stacked matrix: rows are independent given H, so stacking
        q/k/v (gate/up) gives the same codes with one factorisation and one column loop instead of three."""
        out: dict[str, QuantizedWeight] = {}
        for own in dict.fromkeys(owner.values()):
            names = [n for n in linears if owner[n] == own]
            w = torch.cat([linears[n].weight.detach().float() for n in names])  # [Σout, in]
            qw = gptq_quantize(w, stats[own].hessian(), self.qargs)
            start = 0
            for n in names:
                rows = slice(start, start + linears[n].out_features)
                start = rows.stop
                out[n] = QuantizedWeight(qw.qweight[rows].clone(), qw.scales[rows].clone(), qw.zeros[rows].clone(),
                                         None if qw.g_idx is None else qw.g_idx.clone(), qw.bits, qw.group_size,
                                         qw.sym)
        return out


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


@torch.no_grad()
def quantize_model(model, input_ids: torch.Tensor, method: str, qargs: QuantArgs, is_target: Callable[[str], bool],
                   device: torch.device, progress: ProgressFn | None = None, batch_size: int = 8) -> PipelineResult:
    """Quantize every targeted Linear of `model` (on the CPU, modified in place) layer by layer on `device`.

    input_ids [N, L] calibration windows. Returns the codes of every quantized Linear by full module name.
    """
    t_start = time.perf_counter()
    decoder, layers, prefix = decoder_layers(model)
    config = model.config
    shared = getattr(config, "model_type", "") in SUPPORTED_MODEL_TYPES
    n, seq_len = input_ids.shape
    batches = capture_inputs(model, input_ids, batch_size, device)
    n_check = max(1, math.ceil(min(n, max(1, CHECK_TOKENS // seq_len)) / batch_size))  # batches checked
    lq = LayerQuantizer(method, qargs, config, n * seq_len)
    head = model.get_output_embeddings()
    head_name = next((nm for nm, m in model.named_modules() if m is head), None)
    quant_head = head_name is not None and is_target(head_name)
    total = len(layers) + int(quant_head)
    qweights: dict[str, QuantizedWeight] = {}
    reports: list[LayerReport] = []
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        layer.to(device)
        lp = f"{prefix}.{i}."
        linears = {nm: m for nm, m in layer.named_modules() if isinstance(m, nn.Linear) and is_target(lp + nm)}
        owner = _owners(list(linears), shared)
        stats = {nm: lq.collector(linears[nm].in_features, device) for nm in set(owner.values())}
        collect = {nm: linears[nm] for nm, st in stats.items() if st is not None}

        def run(fn: Callable[[int, torch.Tensor], None], limit: int | None = None, _layer=layer) -> None:
            for b, (x, kw) in enumerate(batches[:limit]):
                fn(b, _layer_out(_layer(x, **kw)))

        float_out: list[torch.Tensor] = []

        def keep_float(b: int, y: torch.Tensor, _i=i) -> None:
            _check_finite(y, f"decoder layer {_i}")
            if b < n_check:
                float_out.append(y)

        order: list[str] = []  # collectors in call order, learned on the first (checked, full) batch

        def gather(nm: str, x: torch.Tensor) -> None:
            stats[nm].add(x)
            if nm not in order:
                order.append(nm)

        with _hooks(collect, gather):
            run(keep_float, n_check)
            if collect and len(batches) > n_check:
                # past the checked batches only the collectors' inputs matter: stop the forward right after
                # the last collector has seen its input (Llama: skips down_proj's matmul and the residual)
                with _hooks({order[-1]: collect[order[-1]]}, _stop):
                    for x, kw in batches[n_check:]:
                        with contextlib.suppress(_Stop):
                            layer(x, **kw)

        rtn_meter = _ErrorMeter()
        if method != "rtn":  # RTN itself is the reference: its error ratio is 1 by definition
            saved = _rtn_reference(linears, qargs)
            with act_quant_hooks(linears) if lq.act_bits else contextlib.nullcontext():
                run(lambda b, y: rtn_meter.add(y, float_out[b]), n_check)
            _restore(linears, saved)

        qw, detail = lq.quantize_layer(layer, linears, owner, stats, is_decoder_layer=True)
        stats.clear()  # free Hessians before the next layer
        qweights.update({lp + nm: w for nm, w in qw.items()})

        meter = _ErrorMeter()

        def advance(b: int, y: torch.Tensor, _i=i) -> None:
            _check_finite(y, f"quantized decoder layer {_i}")
            if b < n_check:
                meter.add(y, float_out[b])
            batches[b] = (y, batches[b][1])

        last = i == len(layers) - 1 and not quant_head  # nothing reads its outputs but the check
        with act_quant_hooks(linears) if lq.act_bits else contextlib.nullcontext():
            run(advance, n_check if last else None)
        if method == "rtn":
            rtn_meter = meter
        if device.type != "cpu":
            layer.to("cpu")  # only one layer on the device at a time
        reports.append(LayerReport(f"layer {i}", meter.value, rtn_meter.value, time.perf_counter() - t0, detail))
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


def _quantize_head(model, decoder, head: nn.Linear, head_name: str, batches, lq: LayerQuantizer, n_check: int,
                   device: torch.device) -> tuple[QuantizedWeight, LayerReport]:
    """Quantize the output projection from the final-norm outputs (no scale folding: nothing precedes it but
    the norm shared with nothing else, and a tied embedding is untied first so it stays float)."""
    emb = model.get_input_embeddings()
    if emb is not None and emb.weight is head.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    head.to(device)
    norm = getattr(decoder, "norm", None) or nn.Identity()
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
    qw, _ = lq.quantize_layer(head, linears, {"": ""}, {"": st}, is_decoder_layer=False)
    with act_quant_hooks(linears) if lq.act_bits else contextlib.nullcontext():
        for x, r in zip(check, ref, strict=True):
            meter.add(head(x), r)
    if lq.method == "rtn":
        rtn_meter = meter
    if device.type != "cpu":
        head.to("cpu")
    return qw[""], LayerReport(head_name, meter.value, rtn_meter.value, 0.0)
