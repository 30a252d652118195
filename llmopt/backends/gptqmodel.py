"""GPTQModel (ModelCloud), the maintained successor of AutoGPTQ: GPTQ and AWQ quantizers and CPU/GPU kernels.

Runs unpatched in llmopt's environment on torch 2.13 (its metadata asks torch ≥2.14.1: install it with
`pip install --no-deps gptqmodel` plus its other requirements). On CPU it would compile C++ extensions on
first use (minutes); `pack_impl="original"` and the torch/aten kernels avoid that. It writes logs/ into the
working directory: the worker runs in a temp dir. Worker functions below run inside the backend's Python.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llmopt.backends.base import BackendSpec
from llmopt.errors import LlmoptError

SPEC = BackendSpec(
    name="gptqmodel", module="gptqmodel", dist="gptqmodel", version="==7.7.0",
    methods={"gptq": "gptq", "awq": "awq"},
    requirements=("transformers>=5.20.2", "accelerate>=1.15.0", "safetensors>=0.8.0", "threadpoolctl>=3.7.0",
                  "packaging>=26.3", "device-smi>=0.5.7", "protobuf>=7.36.2", "pillow", "requests",
                  "pypcre>=0.6.4", "tokenicer>=0.0.14", "logbar>=0.4.15", "jinja2", "datasets>=5.1.0", "pyarrow",
                  "dill", "defuser>=0.0.28", "numpy"),  # torchao: optional (fp4 only), and noisy on import
    no_deps=True, own_venv=False,
    env={"GPTQMODEL_CPU_WORKERS": "2"},
    cpu="GPTQ + AWQ quantize (unpatched); load GPTQ/AWQ with torch/aten int4 kernels",
    gpu="GPTQ + AWQ quantize; Marlin/ExLlama/Triton kernels",
)

# CPU kernels that need no compiled extension (the AVX512 ones build C++ on first use)
_KERNELS = {"gptq": "GPTQ_TORCH_ATEN", "awq": "AWQ_TORCH_ATEN"}
# the kernels each method packs with while quantizing (packing needs a kernel with a pack() API)
_PACK = {"gptq": "GPTQ_TORCH_ATEN", "awq": "AWQ_TORCH"}


def probe(job: dict) -> dict:
    import gptqmodel

    return {"library": f"gptqmodel {gptqmodel.__version__}", "patches": []}


def _quant_config(job: dict):
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    common = dict(bits=job["bits"], group_size=job["group_size"], pack_impl="original")
    if job["method"] == "gptq":
        return QuantizeConfig(**common, sym=job["sym"], desc_act=job["act_order"], damp_percent=job["damp"],
                              static_groups=job["static_groups"])
    return QuantizeConfig(**common, sym=job["sym"], method=METHOD.AWQ, format=FORMAT.GEMM)


def quantize(job: dict) -> dict:
    from gptqmodel import BACKEND, GPTQModel

    from llmopt.backends.worker import finish_checkpoint, load_calibration

    if job["method"] not in SPEC.methods:
        raise LlmoptError(f"gptqmodel does not run --method {job['method']}: use gptq or awq")
    device = job["device"]
    calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in load_calibration(job)]
    qcfg = _quant_config(job)
    t = time.perf_counter()
    model = GPTQModel.load(job["model"], qcfg, device=device)
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    # calibration_data_min_length: llmopt already cut fixed-length windows; keep every one of them
    model.quantize(calib, batch_size=1, backend=getattr(BACKEND, _PACK[job["method"]]),
                   calibration_data_min_length=1)
    t_quant = time.perf_counter() - t
    t = time.perf_counter()
    model.save(job["out"])
    finish_checkpoint(Path(job["out"]))
    qc = json.loads((Path(job["out"]) / "config.json").read_text()).get("quantization_config", {})
    return {"library": f"gptqmodel {_version()}", "patches": [], "format": SPEC.methods[job["method"]],
            "timings": {"load": t_load, "quantize": t_quant, "save": time.perf_counter() - t},
            "library_config": {k: v for k, v in qc.items() if k != "meta"},
            "library_meta": qc.get("meta", {})}


def _version() -> str:
    import gptqmodel

    return gptqmodel.__version__


def _load_quantized(job: dict):
    from gptqmodel import BACKEND, GPTQModel

    qc = json.loads((Path(job["checkpoint"]) / "config.json").read_text()).get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if method not in _KERNELS:
        raise LlmoptError(f"gptqmodel loads GPTQ and AWQ checkpoints; {job['checkpoint']} is "
                          f"{method or 'not quantized'}")
    kernel = job.get("kernel") or _KERNELS[method]
    if job["device"] != "cpu" and not job.get("kernel"):
        kernel = "AUTO"
    model = GPTQModel.load(job["checkpoint"], device=job["device"], backend=getattr(BACKEND, kernel.upper()))
    return model.model, kernel  # the transformers module inside GPTQModel's wrapper


def logits(job: dict) -> dict:
    from llmopt.backends.worker import run_prompts, save_logits

    model, kernel = _load_quantized(job)
    save_logits(job["logits_out"], run_prompts(model, job["prompts"], job["device"]))
    return {"library": f"gptqmodel {_version()}", "loader": f"GPTQModel.load(backend={kernel})", "patches": []}


def decode(job: dict) -> dict:
    from llmopt.backends.worker import time_decode

    model, kernel = _load_quantized(job)
    out = time_decode(model, job["prompt"], job["new_tokens"], job["repeats"], job["device"])
    return {**out, "library": f"gptqmodel {_version()}", "kernel": kernel, "patches": []}
