"""AutoAWQ 0.2.9 (deprecated by its authors): AWQ → AWQ GEMM format.

Runs in a venv of its own (`llmopt backends setup autoawq`: transformers 4.51, the last it was released
against) and reads a transformers-5 checkpoint through a config translated for 4.x. Its quantizer runs on
CPU unpatched. Its loader runs on CPU only through intel-extension-for-pytorch (built for torch 2.8, not
this torch), so llmopt does not load AutoAWQ checkpoints with AutoAWQ on CPU: llmopt's runtime and GPTQModel
both read its GEMM format. Worker functions below run inside the backend's Python.
"""

from __future__ import annotations

import time
from pathlib import Path

from llmopt.backends.base import BackendSpec
from llmopt.errors import LlmoptError

SPEC = BackendSpec(
    name="autoawq", module="awq", dist="autoawq", version="==0.2.9",
    methods={"awq": "awq"},
    requirements=("transformers==4.51.3", "tokenizers>=0.12.1", "typing_extensions>=4.8.0", "accelerate",
                  "datasets>=2.20", "zstandard", "huggingface_hub>=0.26.5"),
    no_deps=True, own_venv=True, transformers_max="4.51",
    cpu="AWQ quantize (unpatched, slow); its loader needs IPEX (torch 2.8) on CPU: load with llmopt/GPTQModel",
    gpu="AWQ quantize; GEMM/GEMV CUDA kernels (autoawq-kernels)",
)


def probe(job: dict) -> dict:
    import awq

    return {"library": f"autoawq {awq.__version__}", "patches": []}


def quantize(job: dict) -> dict:
    import awq
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    from llmopt.backends.worker import compat_model_dir, load_calibration, torch_dtype

    if job["method"] != "awq":
        raise LlmoptError(f"autoawq only runs --method awq, not {job['method']}")
    if job["bits"] != 4 or job["group_size"] == -1:
        raise LlmoptError("autoawq writes 4-bit group-wise GEMM weights: use --bits 4 and a positive --group-size")
    src = compat_model_dir(Path(job["model"]), Path(job["scratch"]) / "model")
    windows = load_calibration(job)
    quant_config = {"zero_point": not job["sym"], "q_group_size": job["group_size"], "w_bit": job["bits"],
                    "version": "GEMM"}
    t = time.perf_counter()
    model = AutoAWQForCausalLM.from_pretrained(str(src), torch_dtype=torch_dtype(job["dtype"]), device_map="cpu"
                                               if job["device"] == "cpu" else None, safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    # windows of exactly seq_len tokens: AutoAWQ concatenates and re-splits them into the same windows
    model.quantize(tokenizer, quant_config=quant_config, calib_data=windows, max_calib_samples=len(windows),
                   max_calib_seq_len=len(windows[0]), apply_clip=job["awq_clip"])
    t_quant = time.perf_counter() - t
    t = time.perf_counter()
    model.save_quantized(job["out"], safetensors=True)
    return {"library": f"autoawq {awq.__version__}", "patches": [], "format": "awq",
            "timings": {"load": t_load, "quantize": t_quant, "save": time.perf_counter() - t},
            "library_config": quant_config}


def _no_cpu_loader(job: dict) -> None:
    import torch

    if job["device"] == "cpu" or not torch.cuda.is_available():
        raise LlmoptError("AutoAWQ loads checkpoints on CPU only through intel-extension-for-pytorch, which has no "
                          "build for this torch: load AutoAWQ checkpoints with llmopt or gptqmodel instead")


def logits(job: dict) -> dict:
    _no_cpu_loader(job)
    import awq
    from awq import AutoAWQForCausalLM

    from llmopt.backends.worker import run_prompts, save_logits

    model = AutoAWQForCausalLM.from_quantized(job["checkpoint"], fuse_layers=False, device_map=job["device"])
    save_logits(job["logits_out"], run_prompts(model.model, job["prompts"], job["device"]))
    return {"library": f"autoawq {awq.__version__}", "loader": "AutoAWQForCausalLM.from_quantized", "patches": []}


def decode(job: dict) -> dict:
    _no_cpu_loader(job)
    import awq
    from awq import AutoAWQForCausalLM

    from llmopt.backends.worker import time_decode

    model = AutoAWQForCausalLM.from_quantized(job["checkpoint"], fuse_layers=False, device_map=job["device"])
    out = time_decode(model.model, job["prompt"], job["new_tokens"], job["repeats"], job["device"])
    return {**out, "library": f"autoawq {awq.__version__}", "kernel": "WQLinear_GEMM", "patches": []}
