"""`quantize(QuantizeArgs) -> QuantizeResult`: the one core function behind `llmopt quantize`.

load (CPU) → calibration windows → layer walk (quant/walk.py; methods in quant/methods.py) → format writer into a
temp dir → quant/finish.py: tokenizer + evaluation of the written checkpoint vs the float model → llmopt.json
→ atomic rename.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmopt.checkpoint.types import METHODS, QUANTIZE_FORMATS, QuantArgs
from llmopt.errors import LlmoptError
from llmopt.progress import Progress

LOAD_MODES = ("auto", "memory", "stream")
# Peak RSS of quantizing with the whole float model in memory: GPTQ on a 1.1B Llama shape in fp32 (4.40 GB of
# weights, bench/streaming.py) peaked at 6.88 GB = 1.56×; builtin:tiny (14 MB) at 0.53 GB. 1.6 × + 1 GiB errs on the
# side of streaming, which ran as fast (0.95× the wall time) at 1.65 GB: auto streams when the estimate exceeds the
# budget. Streaming holds one decoder layer, the embeddings or the head, and the activations.
WHOLE_MODEL_FACTOR, WHOLE_MODEL_EXTRA = 1.6, 2 ** 30


@dataclass(slots=True)
class QuantizeArgs:
    """Everything `llmopt quantize` takes; field names = CLI long options with - → _."""

    model: str
    out: Path | None = None
    method: str = "gptq"
    bits: int | None = None  # None: 8 for int8/w8a8, else 4
    group_size: int | None = None  # None: -1 (per channel) for int8/w8a8, else 128
    sym: bool | None = None  # None: asymmetric for awq, symmetric otherwise
    format: str = "compressed-tensors"
    calib: str = "builtin"
    samples: int = 128
    seq_len: int = 256
    split: str | None = None
    text_field: str = "text"
    chat_template: bool = False
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    scale_search: bool = False
    smoothquant_alpha: float = 0.5
    awq_grid: int = 20
    awq_clip: bool = True
    targets: list[str] = field(default_factory=lambda: ["Linear"])
    ignore: list[str] = field(default_factory=list)
    evaluate: bool = True
    eval_data: str = "builtin"
    eval_samples: int = 32
    eval_seq_len: int = 256
    device: str = "auto"
    dtype: str = "auto"
    calib_dtype: str = "auto"  # auto | model | bfloat16: dtype of the calibration forwards (autocast)
    trust_remote_code: bool = False
    revision: str | None = None
    seed: int = 0
    overwrite: bool = False
    backend: str = "llmopt"
    backend_python: str | None = None
    kv_cache: str | None = None  # fp8 | int8: calibrate per-layer K/V scales (quant/kv_scales.py)
    load: str = "auto"  # auto | memory | stream: the whole float model in RAM, or layer by layer from its shards
    max_memory: str | None = None  # auto's budget (e.g. 8GB); None: the memory available now
    layer_check: bool | None = None  # per-layer output check; None: on where the method calibrates anyway

    def __post_init__(self) -> None:
        if self.out is None:
            raise LlmoptError("--out is required: the directory to write the quantized checkpoint to")
        self.out = Path(self.out)
        if self.method not in METHODS:
            raise LlmoptError(f"unknown --method {self.method!r}: use one of {', '.join(METHODS)}")
        from llmopt.quant.methods import method_class

        method = method_class(self.method)  # its rules for bits, group size and symmetry
        if self.bits is None:
            self.bits = method.default_bits
        if self.bits not in method.bits:
            raise LlmoptError(f"--method {self.method} does not support --bits {self.bits}: use "
                              f"{' or '.join(map(str, method.bits))}")
        if self.group_size is None:
            self.group_size = method.default_group_size
        if self.sym is None:
            self.sym = method.default_sym
        if method.symmetric_only and not self.sym:
            raise LlmoptError(f"--method {self.method} is symmetric INT8: drop --asym")
        if self.calib_dtype not in ("auto", "model", "bfloat16"):
            raise LlmoptError(f"--calib-dtype must be auto, model or bfloat16, got {self.calib_dtype!r}")
        if self.static_groups and not self.act_order:
            raise LlmoptError("--static-groups only matters with --act-order: add --act-order or drop it")
        if self.scale_search and (self.method not in ("gptq", "rtn") or self.backend != "llmopt"):
            raise LlmoptError("--scale-search is an option of llmopt's own GPTQ and RTN: use --method gptq or rtn "
                              "without --backend, or drop it")
        for name in ("samples", "seq_len", "eval_samples", "eval_seq_len", "block_size", "awq_grid"):
            if getattr(self, name) <= 0:
                raise LlmoptError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.targets:
            raise LlmoptError("--targets is empty: give module-name patterns or Linear")
        for pat in (*self.targets, *self.ignore):
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    raise LlmoptError(f"bad regular expression in {pat!r}: {e}") from None
        self._check_format(method.act_bits)
        if self.load not in LOAD_MODES:
            raise LlmoptError(f"unknown --load {self.load!r}: use one of {', '.join(LOAD_MODES)}")
        if self.max_memory is not None:
            from llmopt.memory import parse_size

            parse_size(self.max_memory)
        if self.layer_check is None:
            self.layer_check = not method.data_free
        elif not self.layer_check and not method.data_free:
            raise LlmoptError(f"--method {self.method} calibrates on data, which runs the per-layer check anyway: "
                              f"drop --no-layer-check")
        if self.load == "stream" and self.kv_cache is not None:
            raise LlmoptError("--kv-cache calibrates on the whole float model: use --load memory with it")
        if self.backend != "llmopt" and self.load == "stream":
            raise LlmoptError(f"--load stream is llmopt's own pipeline: drop --backend {self.backend}")
        self.quant_args()  # validates the per-Linear settings too

    def _check_format(self, act_bits: int | None) -> None:
        """--format against the other options: what it can store, and what gguf's export would refuse."""
        from llmopt.checkpoint.kv_scales import check_kind

        if self.format not in QUANTIZE_FORMATS:
            raise LlmoptError(f"unknown --format {self.format!r}: use one of {', '.join(QUANTIZE_FORMATS)}")
        if self.format == "gguf":
            from llmopt.checkpoint.formats.gguf import ggml_type

            ggml_type(self.bits, self.sym, act_bits)
            if self.kv_cache is not None:
                raise LlmoptError("GGUF files carry no static KV-cache scales: drop --kv-cache or use --format "
                                  "compressed-tensors")
            if self.backend != "llmopt":
                raise LlmoptError(f"--format gguf is llmopt's own pipeline: drop --backend {self.backend} (or run "
                                  f"llmopt export on its checkpoint)")
        check_kind(self.kv_cache, self.checkpoint_format)
        if self.kv_cache is not None and self.backend != "llmopt":
            raise LlmoptError(f"--kv-cache is calibrated by llmopt's own pipeline: drop --backend {self.backend}")

    @property
    def checkpoint_format(self) -> str:
        """The format of the safetensors checkpoint written (gguf: compressed-tensors, model.gguf beside it)."""
        return "compressed-tensors" if self.format == "gguf" else self.format

    def needs_calibration(self) -> bool:
        """Calibration windows are needed: the method calibrates, the per-layer check runs, or KV scales."""
        return bool(self.layer_check) or self.kv_cache is not None

    def quant_args(self) -> QuantArgs:
        return QuantArgs(bits=self.bits, group_size=self.group_size, sym=self.sym, damp=self.damp,
                         block_size=self.block_size, act_order=self.act_order, static_groups=self.static_groups,
                         scale_search=self.scale_search, smoothquant_alpha=self.smoothquant_alpha,
                         awq_grid=self.awq_grid, awq_clip=self.awq_clip)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass(slots=True)
class QuantizeResult:
    """What a run produced and measured (every number measured in this run)."""

    out: Path
    method: str
    format: str
    quant_args: dict
    calibration: dict
    timings: dict  # seconds per stage
    layers: list[dict]  # per-layer error vs float and vs RTN
    metrics: dict  # float / quantized quality, sizes on disk
    evaluated_with: str | None  # "runtime": the written checkpoint reloaded through llmopt's runtime
    quantized_modules: int
    moe: dict | None = None  # MoE models: experts split per expert, routers kept float, routed tokens per layer
    parameters: dict = field(default_factory=dict)  # kind → {total, targeted, quantized} parameter counts
    kv_cache: dict | None = None  # --kv-cache: the calibrated per-layer K/V scales written (kv_scales.KVScales)
    memory: dict = field(default_factory=dict)  # how the model was loaded and why; peak RSS (and GPU memory)
    gguf: dict | None = None  # --format gguf: model.gguf beside the checkpoint (quant/finish.export_gguf_beside)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def _is_class(module: nn.Module, pattern: str) -> bool:
    """A class-name pattern names the module's class or any base class (Falcon's FalconLinear is a Linear), as
    compressed-tensors matches its targets."""
    return any(cls.__name__ == pattern for cls in type(module).__mro__)


def _match(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return _is_class(module, pattern) or fnmatch.fnmatchcase(name, pattern) or name.endswith("." + pattern)


def target_filter(model, targets: list[str], ignore: list[str]) -> Callable[[str], bool]:
    """Module name → quantize it? Linears matching a target and no ignore pattern. The output head and MoE
    routers (e.g. Qwen2-MoE's shared_expert_gate) are kept float unless a target names them (a class name such
    as Linear does not count)."""
    from llmopt.families import moe

    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    routers = set(moe.router_names(model))

    def is_target(name: str) -> bool:
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear) or any(_match(name, mod, p) for p in ignore):
            return False
        if mod is head or name in routers:
            return any(not _is_class(mod, p) and _match(name, mod, p) for p in targets)
        return any(_match(name, mod, p) for p in targets)

    return is_target


def _check_shapes(model, is_target: Callable[[str], bool], qargs: QuantArgs) -> list[str]:
    from llmopt.quant.rtn import check_group_size

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(n)]
    if not names:
        raise LlmoptError("no Linear module matches --targets (minus --ignore): nothing to quantize")
    for n in names:
        check_group_size(model.get_submodule(n).in_features, qargs.group_size, n)
    emb = model.get_input_embeddings()
    if any(m is emb for n, m in model.named_modules() if n in names):
        raise LlmoptError("embeddings cannot be quantized by llmopt (lookups, not matmuls): remove them from --targets")
    return names


@dataclass(slots=True)
class LoadPlan:
    """Whole model in memory or streamed from its shards, and why (printed, and kept in llmopt.json)."""

    mode: str  # memory | stream
    reason: str
    model_bytes: int  # the float weights at the run's dtype
    budget_bytes: int | None  # --max-memory, else the memory available at the start


def plan_load(args: QuantizeArgs, dtype: torch.dtype) -> LoadPlan:
    """--load auto: the whole model in memory when its measured peak (WHOLE_MODEL_FACTOR × its bytes +
    WHOLE_MODEL_EXTRA) fits the budget, else streamed."""
    from llmopt.checkpoint.shards import ShardReader
    from llmopt.memory import available_bytes, gb, parse_size
    from llmopt.models import ModelSpec
    from llmopt.models.loading import check_weights, resolve_path

    path = resolve_path(ModelSpec(args.model, "cpu", "auto", args.trust_remote_code, args.revision))
    check_weights(path)
    size = torch.empty((), dtype=dtype).element_size()
    entries = ShardReader(path).entries.values()
    model_bytes = sum(e.nbytes // e.dtype.itemsize * size if e.dtype.is_floating_point else e.nbytes for e in entries)
    budget = parse_size(args.max_memory) if args.max_memory else available_bytes()
    whole = int(WHOLE_MODEL_FACTOR * model_bytes + WHOLE_MODEL_EXTRA)
    about = f"the whole model's peak ≈ {gb(whole)} ({gb(model_bytes)} of weights)"
    where = f"--max-memory {args.max_memory}" if args.max_memory else "available"
    if args.load != "auto":
        return LoadPlan(args.load, f"--load {args.load}", model_bytes, budget)
    if args.kv_cache is not None:
        return LoadPlan("memory", "--kv-cache calibrates on the whole model", model_bytes, budget)
    if budget is None:
        return LoadPlan("memory", "available memory unknown", model_bytes, budget)
    if whole <= budget:
        return LoadPlan("memory", f"{about} fits the {gb(budget)} {where}", model_bytes, budget)
    return LoadPlan("stream", f"{about} exceeds the {gb(budget)} {where}", model_bytes, budget)


@dataclass(slots=True)
class _Prepared:
    """The float model made quantizable (in memory, or a meta skeleton streamed from its shards), with what the
    run targets."""

    model: nn.Module
    tokenizer: object
    path: Path
    converted: list[str]  # Conv1D modules turned into nn.Linear
    unfused: list[str]  # fused MoE expert modules split per expert
    is_target: Callable[[str], bool]
    names: list[str]  # the targeted Linears
    by_kind: Callable[[set[str]], dict]  # quantized names → parameter counts by kind
    stream: object | None = None  # models.streaming.WeightStream when streamed


def quantize(args: QuantizeArgs, progress: Progress | None = None) -> QuantizeResult:
    """Quantize args.model with args.method and write the checkpoint to args.out (atomically).

    progress: one Event per quantized layer (task "<method> layer"), or external backends' status messages."""
    if args.backend != "llmopt":
        from llmopt.quant.external import run_backend

        return run_backend(args, progress)

    from llmopt.checkpoint import formats
    from llmopt.quant.accounting import check_all_targeted_quantized
    from llmopt.utils import atomic_dir, check_out_dir, resolve_device, resolve_dtype

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    qargs = args.quant_args()
    check_out_dir(args.out, args.overwrite)  # fail before any heavy work
    formats.check_supported(args.checkpoint_format, args.method, qargs)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    load = plan_load(args, dtype)

    t = time.perf_counter()
    prepared = _prepare(args, qargs, dtype, load.mode)
    timings["load"] = time.perf_counter() - t
    t = time.perf_counter()
    calib, eval_batch = load_data(args, prepared.tokenizer)
    timings["data"] = time.perf_counter() - t

    kv_scales = None
    if args.kv_cache is not None:  # the float model, before any weight is quantized
        from llmopt.quant import kv_scales as kvs

        t = time.perf_counter()
        kv_scales = kvs.calibrate(prepared.model, calib.input_ids, args.kv_cache, device)
        timings["kv_calibrate"] = time.perf_counter() - t
    with atomic_dir(args.out, args.overwrite) as tmp:
        result, streamed = _walk(args, prepared, qargs, calib, eval_batch, device, dtype, tmp, progress)
        timings["quantize"] = result.seconds
        kinds = prepared.by_kind(set(result.qweights))
        check_all_targeted_quantized(kinds)
        if streamed is not None:  # inside "quantize": the parts read from and written to disk during the walk
            timings["stream_read"] = prepared.stream.read_seconds
            timings["stream_write"] = streamed.write_seconds
        t = time.perf_counter()
        quality = None  # a streamed run's quality table, measured during its walk
        if streamed is None:
            formats.write_checkpoint(args.checkpoint_format, prepared.model, result.qweights, tmp, qargs, args.method,
                                     kv_scales=kv_scales)
        else:
            quality = streamed.finish(result.qweights, qargs, args.method, kv_scales)
        timings["write"] = time.perf_counter() - t
        if quality is not None:  # inside "quantize" and "write"
            timings["stream_evaluate"] = streamed.evaluator.seconds
        memory = _memory_record(load, device)
        return _finish(args, prepared, result, kinds, kv_scales, calib, eval_batch, device, dtype, timings, t_all,
                       tmp, memory, quality, progress)


def _walk(args: QuantizeArgs, prepared: _Prepared, qargs: QuantArgs, calib, eval_batch, device: torch.device,
          dtype: torch.dtype, tmp: Path, progress: Progress | None):
    """The layer walk (or the data-free pass), streamed into tmp when the model is (with the quality table
    measured on the way when there is an eval batch); returns (WalkResult, the StreamedCheckpoint or None)."""
    from llmopt.quant.methods import method_class
    from llmopt.quant.walk import quantize_data_free, quantize_model

    streamed = None
    if prepared.stream is not None:
        from llmopt.quant.streamed import StreamedCheckpoint
        from llmopt.quant.streamed_eval import StreamedEval

        evaluator = None if eval_batch is None else StreamedEval(prepared.model, eval_batch.input_ids, device,
                                                                 method_class(args.method).act_bits)
        streamed = StreamedCheckpoint(prepared.model, prepared.stream, args.checkpoint_format, tmp, evaluator)
    if not args.layer_check:
        result = quantize_data_free(prepared.model, args.method, qargs, prepared.is_target, device, progress, streamed,
                                    write_back=streamed is not None and streamed.evaluator is not None)
    else:
        result = quantize_model(prepared.model, calib.input_ids, args.method, qargs, prepared.is_target, device,
                                progress, calib_dtype=_calib_dtype(args.calib_dtype, dtype, device), source=streamed)
    return result, streamed


def _memory_record(load: LoadPlan, device: torch.device) -> dict:
    """How the model was loaded and the peaks measured up to now (quantizing and writing; before evaluation)."""
    from llmopt.memory import peak_gpu_bytes, peak_rss_bytes

    peak = peak_rss_bytes()
    return {"load": load.mode, "reason": load.reason, "model_bytes": load.model_bytes,
            "budget_bytes": load.budget_bytes, "peak_rss_bytes": peak,
            "peak_rss_vs_model": None if peak is None or not load.model_bytes else peak / load.model_bytes,
            "peak_gpu_bytes": peak_gpu_bytes(device)}


def _prepare(args: QuantizeArgs, qargs: QuantArgs, dtype: torch.dtype, mode: str) -> _Prepared:
    """The float model on the CPU (whole, or a meta skeleton whose parts stream from disk; the walk moves one
    layer at a time to the device), checked, with every targeted weight a per-module nn.Linear; fails before any
    heavy work."""
    from llmopt.families import registry
    from llmopt.families.linear_like import convert_conv1d
    from llmopt.families.moe import unfuse_experts
    from llmopt.models import ModelSpec, check_seq_len, load_model
    from llmopt.quant.accounting import check_all_targeted_quantized
    from llmopt.quant.methods import method_class
    from llmopt.quant.walk import check_finite_weights
    from llmopt.utils import dtype_name

    spec = ModelSpec(args.model, "cpu", dtype_name(dtype), args.trust_remote_code, args.revision)
    if mode == "stream":
        from llmopt.models.streaming import open_streamed

        loaded = open_streamed(spec, dtype)  # weights checked finite as each part loads
    else:
        loaded = load_model(spec)
        check_finite_weights(loaded.model)
    model = loaded.model
    check_seq_len(model.config, "--seq-len", args.seq_len, args.model)
    if args.evaluate:
        check_seq_len(model.config, "--eval-seq-len", args.eval_seq_len, args.model)
    if method_class(args.method).folds_scales:
        registry.require(model.config)  # no scale mappings, no AWQ/SmoothQuant
    converted = convert_conv1d(model)  # GPT-2's Conv1D ([in, out] weights) → exact nn.Linear
    unfused = unfuse_experts(model)  # MoE: fused 3-D expert tensors → per-expert Linears every method quantizes
    is_target = target_filter(model, args.targets, args.ignore)
    names = _check_shapes(model, is_target, qargs)
    by_kind = _kind_counter(model, is_target, args)
    check_all_targeted_quantized(by_kind(set(names)))  # before the long part: nothing targeted may stay float
    if args.format == "gguf":  # what the export at the end would refuse
        from llmopt.quant.finish import check_gguf_export

        check_gguf_export(model, loaded.tokenizer, names, qargs, args.method)
    stream = None
    if mode == "stream":
        from llmopt.models.streaming import WeightStream

        stream = WeightStream(model, loaded.reader, loaded.path)  # every parameter has its tensor, or fail now
    return _Prepared(model, loaded.tokenizer, loaded.path, converted, unfused, is_target, names, by_kind, stream)


def load_data(args: QuantizeArgs, tokenizer):
    """(calibration batch or None when nothing calibrates, eval batch or None); the eval set loads before
    quantizing so a too-short one fails before the long part."""
    from llmopt.calibration import DataSpec, load_token_batch

    calib = None
    if args.needs_calibration():
        calib = load_token_batch(DataSpec(args.calib, args.split, args.text_field, args.chat_template), tokenizer,
                                 args.samples, args.seq_len, args.seed, "calib")
    eval_batch = None
    if args.evaluate:
        eval_batch = load_token_batch(DataSpec(args.eval_data), tokenizer, args.eval_samples, args.eval_seq_len,
                                      args.seed, "test")
    return calib, eval_batch


def _finish(args: QuantizeArgs, prepared: _Prepared, result, kinds: dict, kv_scales, calib, eval_batch,
            device: torch.device, dtype: torch.dtype, timings: dict, t_all: float, tmp: Path,
            memory: dict, quality: dict | None, progress: Progress | None) -> QuantizeResult:
    """The shared finish step (quant/finish.py) in the atomic temp dir: tokenizer, evaluation (a streamed run
    brings its own `quality`), model.gguf for --format gguf, llmopt.json."""
    from llmopt.quant.finish import (
        FloatSource,
        Written,
        calibration_record,
        eval_record,
        evaluate_written,
        export_gguf_beside,
        write_quant_manifest,
    )

    model, qargs = prepared.model, args.quant_args()
    ignored = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in result.qweights]
    parameters = {k: c.to_dict() for k, c in kinds.items()}
    calibration = calibration_record(args, calib)
    source = FloatSource(args.model, prepared.path, args.model, args.revision)
    kv_info = None if kv_scales is None else kv_scales.to_dict()
    metrics, evaluated_with = evaluate_written(args, tmp, prepared.tokenizer, source,
                                               None if quality is not None else eval_batch, device, dtype, timings)
    if quality is not None:
        metrics.update(quality)
        metrics["eval"] = eval_record(args, eval_batch)
        evaluated_with = "streamed"
    elif evaluated_with is not None:
        from llmopt.memory import peak_rss_bytes

        memory["peak_rss_with_evaluation_bytes"] = peak_rss_bytes()
    gguf_info = None
    if args.format == "gguf":
        t = time.perf_counter()
        gguf_info = export_gguf_beside(tmp, Path(args.out).name, evaluated_with is not None, progress)
        timings["gguf"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    layers = [r.to_dict() for r in result.layers]
    moe_info = _moe_summary(model, prepared.unfused, layers)
    written = Written(args.checkpoint_format, asdict(qargs), layers, len(prepared.names), ignored, {
        "moe": moe_info, "parameters_by_kind": parameters, "conv1d_as_linear": prepared.converted,
        "scale_migration": _scale_summary(model, args.method), "kv_cache": kv_info, "memory": memory,
        "gguf": gguf_info})
    write_quant_manifest(tmp, args, source, written, calibration, timings, metrics, evaluated_with)
    return QuantizeResult(Path(args.out), args.method, args.format, asdict(qargs), calibration, timings, layers,
                          metrics, evaluated_with, len(prepared.names), moe_info, parameters, kv_info, memory,
                          gguf_info)


def _kind_counter(model, is_target: Callable[[str], bool], args: QuantizeArgs):
    """quantized Linear names → parameter counts by kind (see quant/accounting.py) for this run's targets."""
    from llmopt.quant.accounting import count_by_kind

    def is_ignored(name: str, module: nn.Module) -> bool:
        return any(_match(name, module, p) for p in args.ignore)

    return lambda quantized: count_by_kind(model, quantized, is_target, is_ignored, "Linear" in args.targets)


def _scale_summary(model, method: str) -> dict | None:
    """AWQ/SmoothQuant: per distinct decoder-layer plan, the groups folded and those skipped with the reason."""
    from llmopt.families import registry
    from llmopt.quant.methods import method_class

    if not method_class(method).folds_scales:
        return None
    _, layers, prefix = registry.decoder_layers(model)
    plans: dict[str, dict] = {}
    for i, layer in enumerate(layers):
        d = registry.layer_plan(layer, model.config).to_dict()
        del d["shared_inputs"]
        key = repr(d)
        plans.setdefault(key, {"layers": [], **d})["layers"].append(f"{prefix}.{i}")
    return {"family": model.config.model_type, "plans": list(plans.values())}


def _moe_summary(model, unfused: list[str], layers: list[dict]) -> dict | None:
    """What happened to the experts: which fused modules were split, the float routers, and per decoder layer the
    tokens routed to each expert during calibration (every expert got statistics from all tokens)."""
    if not unfused:
        return None
    from llmopt.families.moe import router_names

    routing = {r["name"]: r["detail"]["moe"] for r in layers if "moe" in r.get("detail", {})}
    starved = sum(len(b["starved"]) for rep in routing.values() for b in rep["blocks"].values())
    return {"unfused_experts": unfused, "float_routers": router_names(model), "routing": routing,
            "starved_experts": starved,
            "starved_treatment": "every expert ran on every calibration token for its statistics (GPTQ Hessians, "
                                 "AWQ/SmoothQuant activation statistics), routed to it or not; layer outputs and "
                                 "the next layer's inputs used the true routing"}


def _calib_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the calibration forwards, or None to run them in the model's own dtype.

    auto: bfloat16 for a float32 model where bf16 matmuls are fast. Measured on two trained models over 4-5
    calibration seeds each, the GPTQ and AWQ KLDs equal the fp32-calibrated ones (the Hessians, statistics
    and solves stay fp32; only the activations feeding them pass through bf16 matmuls)."""
    from llmopt.utils import fast_bf16

    if name == "model" or model_dtype != torch.float32:
        return None
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else None
    if device.type == "cuda" and not fast_bf16(device):
        raise LlmoptError("--calib-dtype bfloat16: this GPU has no bfloat16 support; use --calib-dtype model")
    return torch.bfloat16
