"""llm-compressor (vLLM project): GPTQ, AWQ and RTN through `oneshot`, written as compressed-tensors.

It pins transformers ≤5.17, so next to a newer transformers it runs in a sibling venv
(`llmopt backends setup llmcompressor`). Its AWQ calls `IntermediatesCache.pin_memory`, which raises on a
CPU-only torch: on such a torch the worker replaces it with a no-op (reported as a patch). Worker functions
below run inside the backend's Python.
"""

from __future__ import annotations

import time
from pathlib import Path

from llmopt.backends.base import BackendSpec
from llmopt.errors import LlmoptError

SPEC = BackendSpec(
    name="llmcompressor", module="llmcompressor", dist="llmcompressor", version="==0.14.0.1",
    methods={"gptq": "compressed-tensors", "awq": "compressed-tensors", "rtn": "compressed-tensors"},
    requirements=("llmcompressor==0.14.0.1",), no_deps=False, own_venv=False, transformers_max="5.17",
    cpu="GPTQ, RTN; AWQ with 1 patch (pin_memory no-op on CPU-only torch); transformers decompresses to float",
    gpu="GPTQ, AWQ, RTN, W8A8, FP8 (unpatched); served by vLLM",
)

PIN_MEMORY_PATCH = "llmcompressor.pipelines.cache.IntermediatesCache.pin_memory → no-op (CPU-only torch cannot pin)"


def probe(job: dict) -> dict:
    import llmcompressor

    return {"library": f"llmcompressor {llmcompressor.__version__}", "patches": []}


def _scheme(job: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    gs = job["group_size"]
    weights = QuantizationArgs(num_bits=job["bits"], type="int", symmetric=job["sym"],
                               strategy="channel" if gs == -1 else "group", group_size=None if gs == -1 else gs)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _recipe(job: dict):
    ignore = ["lm_head"]
    if job["method"] == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        actorder = None
        if job["act_order"]:
            actorder = "weight" if job["static_groups"] else "group"
        return [GPTQModifier(config_groups=_scheme(job), ignore=ignore, block_size=job["block_size"],
                             dampening_frac=job["damp"], actorder=actorder)]
    from llmcompressor.modifiers.quantization import QuantizationModifier

    rtn = QuantizationModifier(config_groups=_scheme(job), ignore=ignore)
    if job["method"] == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # AWQModifier only searches and applies the scales; the quantization modifier after it quantizes
        return [AWQModifier(n_grid=job["awq_grid"]), rtn]
    return [rtn]


def _patch_pin_memory() -> list[str]:
    """AWQ pins cached activations for faster GPU onloads; without an accelerator torch refuses to pin."""
    import torch

    if torch.cuda.is_available():
        return []
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return [PIN_MEMORY_PATCH]


def quantize(job: dict) -> dict:
    import json

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmopt.backends.worker import finish_checkpoint, load_calibration, torch_dtype

    if job["method"] not in SPEC.methods:
        raise LlmoptError(f"llmcompressor is driven for --method gptq, awq or rtn, not {job['method']}")
    patches = _patch_pin_memory() if job["method"] == "awq" else []
    windows = load_calibration(job)
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch_dtype(job["dtype"]))
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    if job["device"] != "cpu":
        model.to(job["device"])
    t_load = time.perf_counter() - t
    recipe = _recipe(job)
    t = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, max_seq_length=len(windows[0]),
            num_calibration_samples=len(windows), shuffle_calibration_samples=False)
    t_quant = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(job["out"], save_compressed=True)
    tokenizer.save_pretrained(job["out"])
    finish_checkpoint(Path(job["out"]))
    qc = json.loads((Path(job["out"]) / "config.json").read_text()).get("quantization_config", {})
    return {"library": f"llmcompressor {llmcompressor.__version__}", "patches": patches, "format": "compressed-tensors",
            "timings": {"load": t_load, "quantize": t_quant, "save": time.perf_counter() - t},
            "library_config": {"recipe": [type(m).__name__ for m in recipe], "quantization_config": qc}}


def _load_quantized(job: dict):
    """llm-compressor's checkpoints run in transformers (compressed-tensors decompresses them to float at load)."""
    from transformers import AutoModelForCausalLM

    from llmopt.backends.worker import torch_dtype

    model = AutoModelForCausalLM.from_pretrained(job["checkpoint"], dtype=torch_dtype(job.get("dtype", "float32")))
    return model.to(job["device"]).eval()


def logits(job: dict) -> dict:
    import transformers

    from llmopt.backends.worker import run_prompts, save_logits

    model = _load_quantized(job)
    save_logits(job["logits_out"], run_prompts(model, job["prompts"], job["device"]))
    return {"library": f"transformers {transformers.__version__} (llmcompressor venv)",
            "loader": "AutoModelForCausalLM.from_pretrained (decompressed to float)", "patches": []}


def decode(job: dict) -> dict:
    import llmcompressor

    from llmopt.backends.worker import time_decode

    model = _load_quantized(job)
    out = time_decode(model, job["prompt"], job["new_tokens"], job["repeats"], job["device"])
    return {**out, "library": f"llmcompressor {llmcompressor.__version__}",
            "kernel": "transformers + compressed-tensors (decompressed to float)", "patches": []}
