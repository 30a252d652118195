"""Resolve a model argument (hub id, local dir, builtin:NAME) and load it, safetensors only."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmopt.checkpoint.manifest import read_manifest
from llmopt.errors import LlmoptError
from llmopt.utils import resolve_device, resolve_dtype, text_config

BUILTIN_PREFIX = "builtin:"
# Architectures whose checkpoints carry no causal LM head: clear error instead of a random head.
_ENCODER_ONLY = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                 "mpnet", "camembert", "ernie", "modernbert", "funnel", "layoutlm", "xlm", "flaubert", "squeezebert"}
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the user asked for: a hub id, a local directory, or builtin:NAME, and how to run it."""

    name: str
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise LlmoptError("empty model argument: give a hub id, a local directory or builtin:tiny")


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run, with its tokenizer and what it was loaded from."""

    model: Any  # transformers PreTrainedModel (possibly with llmopt runtime modules inside)
    tokenizer: Any
    spec: ModelSpec
    path: Path
    device: torch.device
    dtype: torch.dtype
    meta: dict = field(default_factory=dict)  # llmopt.json of the checkpoint, if any

    @property
    def config(self):
        return self.model.config

    @property
    def quantization(self) -> dict | None:
        qc = getattr(self.model.config, "quantization_config", None)
        return qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)


def resolve_path(spec: ModelSpec) -> Path:
    """Local directory holding the checkpoint; builds builtin models and downloads hub ids as needed."""
    name = spec.name.strip()
    if name.startswith(BUILTIN_PREFIX):
        from llmopt.models.builtin import ensure_built

        return ensure_built(name[len(BUILTIN_PREFIX):], progress=_build_progress())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LlmoptError(f"model path {path} is a file: give the checkpoint directory that holds config.json")
        return path
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise LlmoptError(f"model path {name} does not exist: give a local checkpoint directory, a hub id "
                          f"(org/name) or builtin:tiny")
    return _download(name, spec.revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES))
    except Exception as e:  # network errors, 401/404, offline mode: all mean "cannot get it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LlmoptError(f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face "
                          f"hub ({type(e).__name__}: {first[:160]}): check the id, your network and HF_TOKEN") from e


def load_config(path: Path, trust_remote_code: bool = False):
    """The checkpoint's config, checked to describe a causal (decoder) language model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise LlmoptError(f"{path} has no config.json: expected a Hugging Face causal LM checkpoint directory")
    try:
        raw = json.loads(cfg_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise LlmoptError(f"{cfg_file} is not valid JSON{where}: fix or re-download it") from None
    if not isinstance(raw, dict):
        raise LlmoptError(f"{cfg_file} is not a JSON object: fix or re-download it")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        hint = " (pass --trust-remote-code if you trust its code)" if "trust_remote_code" in str(e) else ""
        raise LlmoptError(f"{cfg_file} is not a config transformers understands{hint}") from e
    except (OSError, EOFError) as e:  # remote code named by auto_map but absent; a confirmation prompt without stdin
        raise _remote_code_error(path, raw, e) from e
    mtype = getattr(config, "model_type", "")
    if mtype in _ENCODER_ONLY or getattr(config, "is_encoder_decoder", False):
        raise LlmoptError(f"{path} is a {mtype!r} model ({'encoder-decoder' if config.is_encoder_decoder else 'encoder-only'}): "
                          f"llmopt needs a decoder-only causal LM such as Llama, Mistral or Qwen")
    archs = getattr(config, "architectures", None) or []
    is_causal = mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or any(a.endswith(("ForCausalLM", "LMHeadModel"))
                                                                     for a in archs)
    if not is_causal and not (trust_remote_code and getattr(config, "auto_map", None)):
        raise LlmoptError(f"{path} holds a {mtype!r} model that is not a causal LM: llmopt needs a decoder-only LM")
    return config


def _remote_code_error(path: Path, raw: dict, e: BaseException) -> LlmoptError:
    names = sorted({str(v).split(".")[0] + ".py" for v in (raw.get("auto_map") or {}).values()
                    if isinstance(v, str)})
    missing = [n for n in names if not (path / n).exists()]
    if missing:
        return LlmoptError(f"{path} names custom code in config.json's auto_map that is not there ({', '.join(missing)}"
                           f"): copy the model's .py files beside config.json, or drop --trust-remote-code")
    if isinstance(e, EOFError):
        return LlmoptError(f"transformers asked to confirm running {path}'s custom code but stdin is not a terminal: "
                           f"pass --trust-remote-code to allow it")
    return LlmoptError(f"cannot read {path}/config.json ({type(e).__name__}: {str(e).splitlines()[0][:160]})")


def max_context(config) -> int:
    """The longest sequence the model was built for (max_position_embeddings; unbounded when it names none)."""
    text = text_config(config)
    return int(getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 2 ** 31)


def check_seq_len(config, option: str, tokens: int, name: str) -> None:
    """Refuse windows longer than the model's context (positions past its trained or learned range)."""
    ctx = max_context(config)
    if tokens > ctx:
        raise LlmoptError(f"{option} {tokens} exceeds {name}'s maximum context of {ctx}: lower {option}")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LlmoptError(f"cannot load a tokenizer from {path} ({type(e).__name__}): the checkpoint needs "
                          f"tokenizer files") from e
    if tok.pad_token_id is None:  # batching needs a pad id; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def read_json_config(path: Path) -> dict:
    """config.json as a dict (load_config has already checked it parses)."""
    return json.loads((path / "config.json").read_text())


def check_weights(path: Path) -> None:
    """Every weight file a checkpoint names exists and passes the header/size checks (no tensor is read)."""
    from llmopt.checkpoint.shards import read_header, weight_files

    _check_safetensors(path)
    names = set(weight_files(path)) | set(path.glob("*.safetensors"))
    for f in sorted(names):
        read_header(f)


def _check_safetensors(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    unsafe = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if unsafe:
        raise LlmoptError(f"{path} has only pickle weights ({unsafe[0]}): llmopt loads safetensors only; convert "
                          f"them with a trusted tool first")
    raise LlmoptError(f"{path} holds no .safetensors weights: expected a causal LM checkpoint directory")


def load_model(spec: ModelSpec | str) -> LoadedModel:
    """Load a causal LM (float or an llmopt-readable quantized checkpoint) on the requested device/dtype."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # llmopt draws its own progress; keep error output to one line
    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    path = resolve_path(spec)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    config = load_config(path, spec.trust_remote_code)
    check_weights(path)
    tokenizer = load_tokenizer(path, spec.trust_remote_code)
    legacy = path / "quantize_config.json"  # old AutoGPTQ checkpoints keep their settings only there
    if getattr(config, "quantization_config", None) is None and legacy.exists():
        config.quantization_config = {"quant_method": "gptq", **json.loads(legacy.read_text())}
    if getattr(config, "quantization_config", None) is not None:
        from llmopt.runtime import load_quantized_model

        model = load_quantized_model(path, config, device, dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                         trust_remote_code=spec.trust_remote_code)
        except (OSError, ValueError, EOFError) as e:
            if isinstance(e, EOFError) or "auto_map" in str(e) or ".py" in str(e):
                raise _remote_code_error(path, read_json_config(path), e) from e
            raise LlmoptError(f"cannot load weights from {path} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]})") from e
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, spec, path, device, dtype, read_manifest(path))


def save_model(model, tokenizer, out: Path) -> None:
    """Write an HF checkpoint (safetensors) into an existing directory."""
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _build_progress():
    """Building a builtin model on first use, from inside any command: log lines on stderr every 10% of the
    steps (the core draws no bars; `llmopt models build` shows a rich bar)."""
    import logging

    log = logging.getLogger("llmopt")
    shown = [-1]

    def on_event(e) -> None:
        if e.done is None or not e.total:
            return
        tenth = 10 * e.done // e.total
        if tenth > shown[0]:
            shown[0] = tenth
            log.warning(f"building the builtin model (first use, cached after): step {e.done}/{e.total}, "
                        f"loss {e.fields.get('loss', float('nan')):.3f}")

    return on_event