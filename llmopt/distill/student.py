"""Student construction: an existing model, N evenly spaced layers of the teacher, or a config.

The layer-dropped student is the DistilBERT-style initialisation: a fresh model of the teacher's
architecture with fewer layers, whose every weight is a copy of the teacher's (the kept decoder layers,
plus embeddings, final norm and LM head), so it starts close to the teacher instead of from noise.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmopt.errors import LlmoptError
from llmopt.models import ModelSpec, load_model

STUDENT_KINDS = ("model", "layers", "config", "builtin")


@dataclass(slots=True)
class Student:
    """The student to train, with where it came from (recorded in llmopt.json)."""

    model: torch.nn.Module
    kind: str  # one of STUDENT_KINDS
    source: str  # the model name / config path / "teacher"
    teacher_layers: list[int] | None = None  # for kind "layers": teacher layer kept as student layer j
    tokenizer: object | None = field(default=None, repr=False)  # the student's own tokenizer, if it has one

    def __post_init__(self) -> None:
        if self.kind not in STUDENT_KINDS:
            raise ValueError(f"unknown student kind {self.kind!r}")

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "teacher_layers": self.teacher_layers,
                "num_layers": num_layers(self.model), "params": sum(p.numel() for p in self.model.parameters())}


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def layer_indices(n_teacher: int, n_student: int) -> list[int]:
    """n_student evenly spaced teacher layers, first and last included (for n_student ≥ 2)."""
    if not 0 < n_student < n_teacher:
        raise LlmoptError(f"--student-layers must be between 1 and {n_teacher - 1} (the teacher has {n_teacher} "
                          f"layers), got {n_student}")
    if n_student == 1:
        return [0]
    return [round(j * (n_teacher - 1) / (n_student - 1)) for j in range(n_student)]


def decoder_layers_name(model) -> str:
    """Dotted name of the ModuleList of decoder layers (model.layers: Llama/Qwen/Mistral; transformer.h: GPT-2)."""
    n = num_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name.split(".")[-1] in ("layers", "h"):
            return name
    raise LlmoptError(f"cannot find the decoder layers of {type(model).__name__}: use --student or --student-config")


def _fresh(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # random init is part of the run's reproducibility
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _subset_config(config, keep: list[int]):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(keep)
    # Per-layer lists (sliding vs full attention, …) must follow the kept layers.
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == config.num_hidden_layers:
        cfg.layer_types = [layer_types[i] for i in keep]
    return cfg


def drop_layers(teacher, n_layers: int, seed: int = 0) -> Student:
    """A student of the teacher's architecture keeping n_layers evenly spaced layers, all weights copied."""
    keep = layer_indices(num_layers(teacher), n_layers)
    prefix = decoder_layers_name(teacher) + "."
    student = _fresh(_subset_config(teacher.config, keep), seed)
    remap = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            if int(idx) not in remap:
                continue
            key = f"{prefix}{remap[int(idx)]}.{rest}"
        state[key] = value.detach().to(torch.float32, copy=True)
    missing, unexpected = student.load_state_dict(state, strict=False)
    # Non-persistent buffers (rotary inv_freq) are rebuilt from the config; any real weight left out is a bug.
    real_missing = [k for k in missing if not k.endswith(("inv_freq", "original_inv_freq"))]
    if real_missing or unexpected:
        raise LlmoptError(f"layer copy of {type(teacher).__name__} does not line up (missing {real_missing[:3]}, "
                          f"unexpected {unexpected[:3]}): use --student or --student-config")
    student.tie_weights()
    return Student(student, "layers", "teacher", keep)


def from_config_file(path: Path, seed: int = 0) -> Student:
    """A randomly initialised student from an HF config.json (a file, or a directory holding one)."""
    from transformers import CONFIG_MAPPING

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LlmoptError(f"cannot read student config {file} ({type(e).__name__}): give a Hugging Face "
                          f"config.json") from e
    mtype = raw.get("model_type") if isinstance(raw, dict) else None
    if mtype not in CONFIG_MAPPING:
        raise LlmoptError(f"student config {file} has no known model_type (got {mtype!r}): give a Hugging Face "
                          f"config.json of a causal LM, e.g. with \"model_type\": \"llama\"")
    config = CONFIG_MAPPING[mtype].from_dict(raw)
    return Student(_fresh(config, seed), "config", str(path))


def from_builtin_recipe(name: str, seed: int = 0) -> Student | None:
    """builtin:NAME whose recipe is a config only (tiny-student): built untrained from the recipe, no cache."""
    from llmopt.models.builtin import get_recipe

    recipe = get_recipe(name.removeprefix("builtin:"))
    if recipe.trainable:
        return None
    return Student(_fresh(recipe.llama_config(), seed), "builtin", name)


def from_model(name: str, trust_remote_code: bool = False, revision: str | None = None) -> Student:
    """An existing checkpoint (local dir, hub id, builtin:NAME), loaded on CPU in float32 for training."""
    loaded = load_model(ModelSpec(name, device="cpu", dtype="float32", trust_remote_code=trust_remote_code,
                                  revision=revision))
    if loaded.quantization is not None:
        raise LlmoptError(f"student {name} is a quantized checkpoint: distil into a float model, then quantize it")
    loaded.model.train()
    return Student(loaded.model, "model", name, tokenizer=loaded.tokenizer)


def fresh_copy(student: Student, seed: int) -> torch.nn.Module:
    """The same architecture as the student, randomly initialised (the --compare-scratch baseline)."""
    return _fresh(copy.deepcopy(student.model.config), seed)


def check_same_vocab(teacher, teacher_tokenizer, student: Student) -> None:
    """Distillation compares next-token distributions: both models must share the vocabulary and tokenizer."""
    vt, vs = int(teacher.config.vocab_size), int(student.model.config.vocab_size)
    if vt != vs:
        raise LlmoptError(f"student vocabulary ({vs} tokens) differs from the teacher's ({vt}): distillation needs "
                          f"the teacher's tokenizer; use --student-layers, or a student config with vocab_size {vt}")
    if student.tokenizer is not None and student.tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise LlmoptError(f"student {student.source} has a different tokenizer from the teacher's (same size "
                          f"{vs}, different tokens): distillation needs the teacher's tokenizer")


def hidden_layer_map(n_teacher: int, n_student: int) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices matched by relative depth (uniform mapping, TinyBERT).

    Indices are into `output_hidden_states` (0 = embeddings, i = after layer i); the last pair is both
    models' final states, so depth-proportional matching ends on the states the LM heads read.
    """
    return [(j, round(j * n_teacher / n_student)) for j in range(1, n_student + 1)]
