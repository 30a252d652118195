"""AutoGPTQ 0.7.1 (unmaintained; the library llmopt was first specified with): GPTQ → GPTQ format.

It imports only with transformers ≤4.53, so it runs in a venv of its own (`llmopt backends setup auto-gptq`)
and reads a transformers-5 checkpoint through a config translated for 4.x. On a CPU-only torch it quantizes
only with three patches to its CUDA assumptions, all applied here and reported in llmopt.json:
its loader refuses without CUDA, its layer loop moves layers to a hard-coded cuda:0, and GPTQ calls
torch.cuda.synchronize(). Its CPU inference uses its pure-torch QuantLinear (the CUDA kernels are not built
for this torch). Worker functions below run inside the backend's Python.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from llmopt.backends.base import BackendSpec
from llmopt.errors import LlmoptError

SPEC = BackendSpec(
    name="auto-gptq", module="auto_gptq", dist="auto-gptq", version="==0.7.1",
    methods={"gptq": "gptq"},
    requirements=("transformers==4.53.3", "accelerate>=0.26,<1.11", "peft>=0.5,<0.17", "datasets", "sentencepiece",
                  "numpy", "safetensors", "tqdm", "rouge", "gekko"),
    no_deps=True, own_venv=True, transformers_max="4.53",
    cpu="GPTQ quantize with 3 patches (CUDA checks); load through its pure-torch QuantLinear (no CPU kernel)",
    gpu="GPTQ quantize unpatched; CUDA/ExLlama/Marlin kernels built for torch 2.2 only (wheel)",
)

PATCHES_CPU = [
    "BaseGPTQForCausalLM.from_pretrained: CUDA-availability check bypassed (torch.cuda.is_available → True "
    "during the call)",
    "auto_gptq.modeling._base.CUDA_0 → cpu (its layer loop moves each layer to cuda:0)",
    "torch.cuda.synchronize → no-op (called by GPTQ.fasterquant)",
]


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def _apply_patches() -> list[str]:
    """The three minimal patches that let AutoGPTQ's quantizer run without CUDA; none when CUDA is present."""
    import torch

    if not _cpu_only():
        return []
    import auto_gptq.modeling._base as base

    base.CUDA_0 = torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    return list(PATCHES_CPU)


@contextlib.contextmanager
def _pretend_cuda():
    import torch

    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_available = real


def probe(job: dict) -> dict:
    import auto_gptq

    return {"library": f"auto-gptq {auto_gptq.__version__}", "patches": PATCHES_CPU if _cpu_only() else []}


def quantize(job: dict) -> dict:
    import auto_gptq
    import torch
    from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig

    from llmopt.backends.worker import compat_model_dir, load_calibration, torch_dtype

    if job["method"] != "gptq":
        raise LlmoptError(f"auto-gptq only runs --method gptq, not {job['method']}")
    if job["bits"] not in (2, 3, 4, 8):
        raise LlmoptError(f"auto-gptq supports --bits 2, 3, 4 or 8, not {job['bits']}")
    patches = _apply_patches()
    src = compat_model_dir(Path(job["model"]), Path(job["scratch"]) / "model")
    qcfg = BaseQuantizeConfig(bits=job["bits"], group_size=job["group_size"], desc_act=job["act_order"],
                              static_groups=job["static_groups"], sym=job["sym"], damp_percent=job["damp"],
                              true_sequential=True)
    t = time.perf_counter()
    with _pretend_cuda() if patches else contextlib.nullcontext():
        model = AutoGPTQForCausalLM.from_pretrained(str(src), qcfg, torch_dtype=torch_dtype(job["dtype"]))
    t_load = time.perf_counter() - t
    examples = [{"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
                for ids in load_calibration(job)]
    t = time.perf_counter()
    model.quantize(examples, batch_size=1, use_triton=False, cache_examples_on_gpu=not patches)
    t_quant = time.perf_counter() - t
    t = time.perf_counter()
    model.save_quantized(job["out"], use_safetensors=True)
    return {"library": f"auto-gptq {auto_gptq.__version__}", "patches": patches, "format": "gptq",
            "timings": {"load": t_load, "quantize": t_quant, "save": time.perf_counter() - t},
            "library_config": qcfg.to_dict()}


def _load_quantized(job: dict):
    from auto_gptq import AutoGPTQForCausalLM

    from llmopt.backends.worker import compat_model_dir

    src = compat_model_dir(Path(job["checkpoint"]), Path(job["scratch"]) / "checkpoint")
    files = sorted(p.name for p in src.glob("*.safetensors"))
    if len(files) != 1:
        raise LlmoptError(f"auto-gptq loads one safetensors file; {job['checkpoint']} has {len(files)}")
    model = AutoGPTQForCausalLM.from_quantized(str(src), model_basename=files[0].removesuffix(".safetensors"),
                                               device=job["device"], use_triton=False, use_safetensors=True,
                                               disable_exllama=True, disable_exllamav2=True, use_marlin=False)
    return model.model


def logits(job: dict) -> dict:
    import auto_gptq

    from llmopt.backends.worker import run_prompts, save_logits

    model = _load_quantized(job)
    save_logits(job["logits_out"], run_prompts(model, job["prompts"], job["device"]))
    return {"library": f"auto-gptq {auto_gptq.__version__}", "loader": "AutoGPTQForCausalLM.from_quantized",
            "patches": []}


def decode(job: dict) -> dict:
    import auto_gptq

    from llmopt.backends.worker import time_decode

    model = _load_quantized(job)
    out = time_decode(model, job["prompt"], job["new_tokens"], job["repeats"], job["device"])
    return {**out, "library": f"auto-gptq {auto_gptq.__version__}", "kernel": "qlinear_cuda_old (torch fallback)",
            "patches": []}
