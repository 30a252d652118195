"""`verify(VerifyArgs) -> VerifyResult`: load a checkpoint in external loaders (transformers, GPTQModel,
AutoGPTQ, vLLM), run the same prompts as llmopt's own runtime, and compare the logits.

Per loader: max |Δlogit| over every position, mean and max KL(llmopt ‖ loader) of the next-token
distributions (float64), top-1 agreement over all positions and over the decided ones (llmopt's top two
logits at least --tie-margin apart: two correct loaders that both run bf16 activations flip near-ties, ~1-3% of
positions on builtin:tiny, while a misread weight moves logits by whole units). A loader fails the check when
mean KL exceeds --kld-tol or decided top-1 agreement falls below --min-top1; any failure → CheckFailed (exit 1).
A checkpoint whose kv_cache_scheme declares static (calibrated) KV scales fails first, before any loader runs,
when its k_scale/v_scale tensors are missing or all exactly 1.0 (vLLM's silent default).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmopt.errors import CheckFailed, LlmoptError

LOADERS = ("transformers", "gptqmodel", "auto-gptq", "autoawq", "vllm")
# which checkpoint formats each loader reads (llmopt's names, from llmopt.checkpoint.formats.quant_method)
_READS = {"transformers": ("compressed-tensors",), "gptqmodel": ("gptq", "awq"), "auto-gptq": ("gptq",),
          "autoawq": ("awq",), "vllm": ("compressed-tensors", "gptq", "awq")}


@dataclass(slots=True)
class VerifyArgs:
    """`llmopt verify CHECKPOINT --with L1,L2`; `loaders` is --with (a keyword in Python), None: every
    installed loader that reads the checkpoint's format."""

    checkpoint: str
    loaders: list[str] | None = None
    data: str = "builtin"
    prompts: int = 4
    prompt_len: int = 64
    kld_tol: float = 1e-3
    min_top1: float = 0.99
    tie_margin: float = 0.25  # logits: positions closer than this between llmopt's top two are near-ties
    device: str = "auto"
    seed: int = 0
    backend_python: str | None = None

    def __post_init__(self) -> None:
        if self.loaders is not None:
            self.loaders = [s.strip() for s in self.loaders if s.strip()]
            unknown = [s for s in self.loaders if s not in LOADERS]
            if unknown:
                raise LlmoptError(f"unknown loader {unknown[0]!r} in --with: use {', '.join(LOADERS)}")
            if not self.loaders:
                raise LlmoptError(f"--with is empty: name loaders among {', '.join(LOADERS)}")
        if self.prompts <= 0 or self.prompt_len <= 1:
            raise LlmoptError("--prompts must be positive and --prompt-len at least 2")
        if self.kld_tol <= 0 or not 0 <= self.min_top1 <= 1 or self.tie_margin < 0:
            raise LlmoptError("--kld-tol must be positive, --min-top1 in [0, 1] and --tie-margin ≥ 0")


@dataclass(slots=True)
class LoaderCheck:
    loader: str
    how: str  # the exact loader call / library version
    max_abs_diff: float | None
    kld_mean: float | None
    kld_max: float | None
    top1_agreement: float  # all positions
    top1_decided: float  # positions where llmopt's top two logits are ≥ tie_margin apart
    decided: float  # fraction of positions that are decided
    passed: bool
    seconds: float
    note: str = ""


@dataclass(slots=True)
class VerifyResult:
    checkpoint: str
    format: str
    reference: str  # llmopt's runtime, kernels it used
    prompts: int
    prompt_len: int
    checks: list[LoaderCheck] = field(default_factory=list)
    kld_tol: float = 1e-3
    min_top1: float = 0.99
    tie_margin: float = 0.25
    kv_scales: dict | None = None  # calibrated KV scales found (layers, kind, max k/v scale); None: no static scheme

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare(ref: torch.Tensor, other: torch.Tensor, tie_margin: float = 0.25
            ) -> tuple[float, float, float, float, float, float]:
    """(max |Δ|, mean KL, max KL, top-1 agreement, top-1 agreement where decided, decided fraction) of logits
    [P, L, V] vs the reference, KL(ref ‖ other); decided = the reference's top two ≥ tie_margin apart."""
    from llmopt.evaluate.quality import kl_per_token

    if ref.shape != other.shape:
        raise LlmoptError(f"loader returned logits of shape {tuple(other.shape)}, llmopt {tuple(ref.shape)}")
    kl = kl_per_token(ref, other)  # [P, L]
    same = ref.argmax(-1) == other.argmax(-1)  # [P, L]
    top2 = ref.float().topk(2, dim=-1).values  # [P, L, 2]
    decided = (top2[..., 0] - top2[..., 1]) >= tie_margin  # [P, L]
    top1_decided = same[decided].double().mean().item() if decided.any() else 1.0
    return ((ref.double() - other.double()).abs().max().item(), kl.mean().item(), kl.max().item(),
            same.double().mean().item(), top1_decided, decided.double().mean().item())


def _installed(loader: str, backend_python: str | None) -> str | None:
    """None when `loader` can run here, else why not (one line, with what to install)."""
    from llmopt.backends.base import dist_version, find_interpreter

    if loader == "transformers":
        return None
    if loader == "vllm":
        if dist_version("vllm") is None:
            return "vLLM is not installed (pip install vllm, on a CUDA machine)"
        if not torch.cuda.is_available():
            return "vLLM needs a CUDA GPU and none is visible"
        return None
    if loader == "autoawq" and not torch.cuda.is_available():
        return ("AutoAWQ's loader runs on CPU only through intel-extension-for-pytorch, which has no build for "
                "this torch: verify AWQ checkpoints with gptqmodel here")
    from llmopt.backends import get_spec

    try:
        find_interpreter(get_spec(loader), backend_python)
    except LlmoptError as e:
        return str(e)
    return None


def _reference_logits(path: Path, prompts: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, str]:
    from llmopt.models import ModelSpec, load_model
    from llmopt.runtime import kernel_report, set_kernel

    loaded = load_model(ModelSpec(str(path), str(device), "float32"))
    # the checkpoint's own arithmetic in float32 (the kernels' tested reference): the fast CPU kernel rounds
    # activations to int8, which would blur the comparison with loaders that do not
    set_kernel(loaded.model, "dequant")
    with torch.inference_mode():
        logits = torch.stack([loaded.model(input_ids=p[None].to(device)).logits[0].float().cpu() for p in prompts])
    kernels = sorted({k.split(" ", 1)[0] for _, k in kernel_report(loaded.model)})
    return logits, f"llmopt runtime ({', '.join(kernels) or 'float'})"


def _transformers_logits(path: Path, prompts: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, str]:
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).to(device).eval()
    with torch.inference_mode():
        logits = torch.stack([model(input_ids=p[None].to(device)).logits[0].float().cpu() for p in prompts])
    return logits, f"transformers {transformers.__version__} AutoModelForCausalLM.from_pretrained"


def _worker_logits(loader: str, path: Path, prompts: torch.Tensor, device: torch.device,
                   backend_python: str | None) -> tuple[torch.Tensor, str]:
    from safetensors.torch import load_file

    from llmopt.backends import get_spec
    from llmopt.backends.base import find_interpreter, run_worker

    spec = get_spec(loader)
    interp = find_interpreter(spec, backend_python)
    with tempfile.TemporaryDirectory(prefix="llmopt-verify-") as tmp:
        out = Path(tmp) / "logits.safetensors"
        res = run_worker(spec, interp, {"kind": "logits", "checkpoint": str(path.resolve()), "prompts": prompts.tolist(),
                                        "logits_out": str(out), "device": str(device), "scratch": tmp,
                                        "threads": torch.get_num_threads()}).result
        logits = load_file(str(out))["logits"]
    patched = f", PATCHED: {'; '.join(res['patches'])}" if res.get("patches") else ""
    return logits, f"{res['library']} {res['loader']}{patched}"


def _vllm_logits(path: Path, prompts: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, str]:
    """vLLM returns log-probs of its top-k tokens per prompt position, not full logits: the comparison is made
    on a [P, L, V] tensor holding vLLM's log-probs at those ids and the reference's log-probs elsewhere, so
    KL and top-1 compare exactly what vLLM reports (k = 20)."""
    import vllm
    from vllm import LLM, SamplingParams

    k = 20
    llm = LLM(model=str(path), dtype="float32" if ref.dtype == torch.float32 else "auto", enforce_eager=True,
              gpu_memory_utilization=0.5)
    params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": p.tolist()} for p in prompts], params, use_tqdm=False)
    logp = torch.log_softmax(ref.double(), dim=-1)  # [P, L, V]
    mixed = logp.clone()
    for i, out in enumerate(outs):
        # prompt_logprobs[j] scores token j given tokens < j: it is the distribution at position j - 1
        for j, entry in enumerate(out.prompt_logprobs):
            if entry is None:
                continue
            for tok, lp in entry.items():
                mixed[i, j - 1, tok] = lp.logprob
    mixed[:, -1] = logp[:, -1]  # vLLM does not score the position after the prompt
    return mixed.float(), f"vllm {vllm.__version__} LLM(...).generate(prompt_logprobs={k})"


def verify(args: VerifyArgs, progress: Callable[[str], None] | None = None) -> VerifyResult:
    """Compare llmopt's runtime logits with each loader's on the same prompts; CheckFailed on any mismatch."""
    import time

    from llmopt.calibration import DataSpec, load_token_batch
    from llmopt.checkpoint.formats import quant_method, read_config
    from llmopt.models import ModelSpec, resolve_path
    from llmopt.models.loading import load_tokenizer
    from llmopt.utils import resolve_device

    path = resolve_path(ModelSpec(args.checkpoint))
    config = read_config(path)
    if not config.get("quantization_config"):
        raise LlmoptError(f"{path} is not a quantized checkpoint (no quantization_config in config.json): "
                          f"verify checks checkpoints written by llmopt quantize")
    fmt = quant_method(config)
    from llmopt.checkpoint.kv_scales import check_checkpoint

    kv_summary = check_checkpoint(path, config)  # CheckFailed: calibrated kv_cache_scheme, scales missing or all 1.0
    loaders = args.loaders
    if loaders is None:  # every installed loader that reads this format
        loaders = [name for name in LOADERS if fmt in _READS[name] and _installed(name, args.backend_python) is None]
        if not loaders:
            raise LlmoptError(f"no external loader for {fmt} checkpoints is installed here: install one of "
                              f"{', '.join(n for n in LOADERS if fmt in _READS[n])} (see llmopt backends doctor)")
    for name in loaders:
        if fmt not in _READS[name]:
            raise LlmoptError(f"{name} does not load {fmt} checkpoints (it reads {', '.join(_READS[name])}): "
                              f"drop it from --with")
        why = _installed(name, args.backend_python)
        if why is not None:
            raise LlmoptError(f"cannot verify with {name}: {why}")
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(path)
    prompts = load_token_batch(DataSpec(args.data), tokenizer, args.prompts, args.prompt_len, args.seed,
                               "test").input_ids  # [P, L]
    say = progress or (lambda msg: None)
    say("llmopt runtime")
    ref, ref_how = _reference_logits(path, prompts, device)
    result = VerifyResult(str(path), fmt, ref_how, args.prompts, args.prompt_len, kld_tol=args.kld_tol,
                          min_top1=args.min_top1, tie_margin=args.tie_margin, kv_scales=kv_summary)
    for name in loaders:
        say(name)
        t = time.perf_counter()
        if name == "transformers":
            logits, how = _transformers_logits(path, prompts, device)
        elif name == "vllm":
            logits, how = _vllm_logits(path, prompts, ref)
        else:
            logits, how = _worker_logits(name, path, prompts, device, args.backend_python)
        max_abs, kld, kld_max, top1, top1_decided, decided = compare(ref, logits, args.tie_margin)
        note = "logits: top-20 log-probs only (vLLM); max |Δ| not comparable" if name == "vllm" else ""
        result.checks.append(LoaderCheck(name, how, None if name == "vllm" else max_abs, kld, kld_max, top1,
                                         top1_decided, decided, kld <= args.kld_tol and top1_decided >= args.min_top1,
                                         time.perf_counter() - t, note))
    return result


def check(result: VerifyResult) -> None:
    """Raise CheckFailed naming every loader whose logits do not match llmopt's."""
    bad = [c for c in result.checks if not c.passed]
    if bad:
        raise CheckFailed("logits differ from llmopt's runtime in " + ", ".join(
            f"{c.loader} (mean KL {c.kld_mean:.2e} vs tol {result.kld_tol:.0e}, decided top-1 {c.top1_decided:.3f} "
            f"vs min {result.min_top1})" for c in bad))
