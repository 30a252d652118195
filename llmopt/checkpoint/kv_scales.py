"""Static KV-cache scales in a checkpoint, in the layout vLLM reads (calibrated by quant/kv_scales.py).

Calibration: the float model runs forwards over the calibration windows with an attention function that
records, per layer (the attention module's layer_idx), the absolute max of the key states after rotary (what a
KV cache stores) and of the value states, then attends with SDPA. scale = amax / qmax, qmax = 448 (fp8_e4m3) or
127 (int8), so that codes = x / scale fill the code range; one scale per layer for K and one for V.

Checkpoint layout (compressed-tensors, as llm-compressor writes it and vLLM's CompressedTensorsKVCacheMethod /
BaseKVCacheMethod read it):
  quantization_config.kv_cache_scheme = {num_bits: 8, type: float|int, strategy: tensor, symmetric: true,
                                         dynamic: false, group_size: null}
  {attention module}.k_scale, {attention module}.v_scale   float32 scalars (shape []), e.g.
  model.layers.0.self_attn.k_scale. vLLM creates them as torch.tensor(-1.0) parameters, overwrites them from the
  checkpoint, and falls back to 1.0 (with only a warning) when they are absent; `verify` refuses that case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from llmopt.errors import CheckFailed, LlmoptError

KV_CACHE_KINDS = ("fp8", "int8")
QMAX = {"fp8": 448.0, "int8": 127.0}
_TYPE = {"fp8": "float", "int8": "int"}
_SCALE_RE = re.compile(r"^(?P<module>.+)\.(?P<which>[kv])_scale$")


@dataclass(slots=True)
class KVScales:
    """Per-layer static K/V scales: k[i], v[i] = amax / QMAX[kind] of layer i's keys and values."""

    kind: str  # fp8 | int8 (what the scales were computed for)
    k: list[float]
    v: list[float]
    modules: list[str]  # the attention module name of each layer (where the tensors live)
    note: str = ""  # how a checkpoint's scales were adapted (per-head scales reduced to their per-layer max)

    def amax(self) -> tuple[list[float], list[float]]:
        q = QMAX[self.kind]
        return [s * q for s in self.k], [s * q for s in self.v]

    def for_qmax(self, qmax: float) -> list[tuple[float, float]]:
        """(k, v) scale per layer for a cache whose codes span ±qmax (e.g. fp8-calibrated scales in an int8 cache)."""
        r = QMAX[self.kind] / qmax
        return [(k * r, v * r) for k, v in zip(self.k, self.v)]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "strategy": "tensor", "qmax": QMAX[self.kind], "k_scale": self.k,
                "v_scale": self.v}


def check_kind(kind: str | None, fmt: str) -> None:
    if kind is None:
        return
    if kind not in KV_CACHE_KINDS:
        raise LlmoptError(f"--kv-cache must be fp8 or int8, got {kind!r}")
    if fmt != "compressed-tensors":
        raise LlmoptError(f"--kv-cache writes calibrated KV scales only in compressed-tensors checkpoints (vLLM's "
                          f"kv_cache_scheme), not --format {fmt}: use --format compressed-tensors")


def scheme(kind: str) -> dict:
    """quantization_config.kv_cache_scheme for static per-tensor (per-layer) 8-bit KV scales."""
    return {"num_bits": 8, "type": _TYPE[kind], "strategy": "tensor", "symmetric": True, "dynamic": False,
            "group_size": None}


def kind_of(kv_scheme: dict) -> str:
    return "int8" if kv_scheme.get("type") == "int" else "fp8"


def attention_modules(model: torch.nn.Module) -> dict[int, str]:
    """layer_idx → name of the module that calls the attention function (HF's *Attention with a layer_idx)."""
    out: dict[int, str] = {}
    for name, m in model.named_modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and "attention" in type(m).__name__.lower() and idx not in out:
            out[idx] = name
    return out


def tensors(scales: KVScales, rename=lambda n: n) -> dict[str, torch.Tensor]:
    """The checkpoint tensors: {module}.k_scale / .v_scale, float32 scalars."""
    out = {}
    for name, k, v in zip(scales.modules, scales.k, scales.v):
        out[f"{rename(name)}.k_scale"] = torch.tensor(k, dtype=torch.float32)
        out[f"{rename(name)}.v_scale"] = torch.tensor(v, dtype=torch.float32)
    return out


def pop(model: torch.nn.Module, config, state: dict[str, torch.Tensor]) -> KVScales | None:
    """Remove every {module}.k_scale / .v_scale tensor from `state` and return them as a per-layer table for
    `model` (None when the checkpoint has neither a kv_cache_scheme nor scale tensors)."""
    found: dict[str, dict[str, float]] = {}
    per_head = False
    for key in [k for k in state if _SCALE_RE.match(k)]:
        m = _SCALE_RE.match(key)
        t = state.pop(key).float().reshape(-1)  # [] / [1] per tensor, [Hkv] per head (strategy attn_head)
        per_head |= t.numel() > 1
        found.setdefault(m["module"], {})[m["which"]] = float(t.max())
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else {})
    kv_scheme = (qc or {}).get("kv_cache_scheme")
    if not found:
        return None
    if not kv_scheme:
        raise LlmoptError("checkpoint holds k_scale/v_scale tensors but its quantization_config has no "
                          "kv_cache_scheme")
    by_layer = {idx: name for idx, name in attention_modules(model).items()}
    k, v, names = [], [], []
    for idx in sorted(by_layer):
        name = by_layer[idx]
        got = found.get(name, {})
        if "k" not in got or "v" not in got:
            raise LlmoptError(f"checkpoint has a kv_cache_scheme but no {name}.{'k' if 'k' not in got else 'v'}"
                              f"_scale tensor")
        k.append(got["k"])
        v.append(got["v"])
        names.append(name)
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise LlmoptError(f"k_scale/v_scale tensors for {unknown[0]}, which is not an attention module of the model")
    note = "per-head checkpoint scales used as their per-layer max" if per_head else ""
    return KVScales(kind_of(kv_scheme), k, v, names, note)


def _scale_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if _SCALE_RE.match(key):
                    out[key] = fh.get_tensor(key)
    return out


def check_checkpoint(path: Path, config: dict) -> dict | None:
    """For `verify`: None when the checkpoint declares no static KV scheme, else a summary; CheckFailed (one line)
    when the scheme says calibrated but the scales are missing, non-positive / non-finite, or all exactly 1.0
    (what vLLM silently uses when scales are absent)."""
    kv_scheme = (config.get("quantization_config") or {}).get("kv_cache_scheme")
    if not kv_scheme or kv_scheme.get("dynamic"):
        return None
    text = config.get("text_config") or config
    layers = int(text.get("num_hidden_layers") or config.get("num_hidden_layers") or 0)
    found = _scale_tensors(path)
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in found.items():
        m = _SCALE_RE.match(key)
        per_layer.setdefault(m["module"], {})[m["which"]] = t.float().reshape(-1)  # [1] per tensor, [Hkv] per head
    ks = [d["k"] for d in per_layer.values() if "k" in d]
    vs = [d["v"] for d in per_layer.values() if "v" in d]
    if not ks or not vs:
        raise CheckFailed(f"{path}: kv_cache_scheme says calibrated KV scales but the checkpoint has no "
                          f"{'k_scale' if not ks else 'v_scale'} tensors (vLLM would silently use 1.0)")
    if len(ks) < layers or len(vs) < layers:
        raise CheckFailed(f"{path}: kv_cache_scheme says calibrated KV scales but only {min(len(ks), len(vs))} of "
                          f"{layers} layers have k_scale and v_scale (vLLM would use 1.0 for the rest)")
    every = torch.cat(ks + vs)
    bad = every[~torch.isfinite(every) | (every <= 0)]
    if bad.numel():
        raise CheckFailed(f"{path}: KV scales must be positive and finite, found {bad[0].item()}")
    if bool((every == 1.0).all()):
        raise CheckFailed(f"{path}: every k_scale/v_scale is exactly 1.0 — vLLM's default for missing scales, "
                          f"not a calibration: re-run llmopt quantize --kv-cache")
    ks, vs = [float(t.max()) for t in ks], [float(t.max()) for t in vs]
    return {"layers": len(per_layer), "kind": kind_of(kv_scheme), "k_scale_max": max(ks), "v_scale_max": max(vs)}


__all__ = ["KVScales", "KV_CACHE_KINDS", "QMAX", "attention_modules", "check_checkpoint", "check_kind", "kind_of", "pop",
           "scheme", "tensors"]
