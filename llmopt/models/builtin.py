"""`builtin:tiny`: a small Llama that llmopt builds itself, offline, from the builtin corpus.

Build = train a byte-level BPE tokenizer on the train split, then train the model on the
train split's token stream (AdamW, warm-up + cosine), then measure held-out perplexity on
the test split next to a unigram baseline fitted on the train split. Everything is seeded,
so the same seed on the same Python/torch gives the same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmopt.calibration import corpus
from llmopt.calibration.data import token_stream
from llmopt.checkpoint.manifest import read_manifest, write_manifest
from llmopt.errors import LlmoptError
from llmopt.models.scoring import perplexity
from llmopt.models.training import make_optimizer, make_scheduler
from llmopt.progress import Progress, emit
from llmopt.utils import atomic_dir, llmopt_home, sha256_json

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3


@dataclass(frozen=True, slots=True)
class TinyRecipe:
    """Shapes and training settings of a builtin model. Every Linear's input dim is a multiple of 128."""

    name: str = "tiny"
    vocab_size: int = 1024  # small vocab: sub-word pieces are predictable, so a tiny model learns fast
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2  # grouped-query attention: 4 query heads share one kv head
    max_positions: int = 1024
    seq_len: int = 256
    batch_size: int = 8  # more, smaller updates learn faster per CPU-second than big batches here
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    trainable: bool = True  # False: a config only (tiny-student), built untrained on demand

    def __post_init__(self) -> None:
        for dim in (self.hidden_size, self.intermediate_size):
            if dim % 128:
                raise ValueError(f"builtin model dims must be multiples of 128 (got {dim})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.hidden_size // self.num_heads,
            max_position_embeddings=self.max_positions, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
            torch_dtype="float32",
        )


RECIPES: dict[str, TinyRecipe] = {
    "tiny": TinyRecipe(),
    # The distillation student: half the layers of tiny, same tokenizer. A config, not trained here.
    "tiny-student": TinyRecipe(name="tiny-student", num_layers=2, trainable=False),
}


@dataclass(frozen=True, slots=True)
class BuildReport:
    name: str
    path: str
    params: int
    steps: int
    train_tokens: int
    final_loss: float
    test_tokens: int
    perplexity: float
    unigram_perplexity: float
    seconds: float

    @property
    def ratio(self) -> float:
        return self.unigram_perplexity / self.perplexity


def builtin_dir(name: str) -> Path:
    return llmopt_home() / "builtin" / name


def recipe_key(recipe: TinyRecipe) -> str:
    return sha256_json({"recipe": asdict(recipe), "corpus": corpus.corpus_fingerprint(),
                        "torch": torch.__version__})[:16]


def get_recipe(name: str) -> TinyRecipe:
    if name not in RECIPES:
        raise LlmoptError(f"unknown builtin model {name!r}: use one of {', '.join('builtin:' + n for n in RECIPES)}")
    return RECIPES[name]


def cached_report(recipe: TinyRecipe) -> BuildReport | None:
    """The recorded BuildReport of the cached build of exactly this recipe, or None."""
    path = builtin_dir(recipe.name)
    try:
        meta = read_manifest(path)
    except (OSError, LlmoptError):
        return None
    if meta.get("builtin", {}).get("key") != recipe_key(recipe):
        return None
    return BuildReport(name=recipe.name, path=str(path), **meta["metrics"])


def is_built(name: str) -> bool:
    return cached_report(get_recipe(name)) is not None


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (no unknown bytes) wrapped as a transformers fast tokenizer that adds BOS."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=1024, clean_up_tokenization_spaces=False)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [W, seq_len] of a token stream."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def unigram_perplexity(train: torch.Tensor, wins: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on train, on the same tokens as `perplexity`."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = wins[:, 1:].reshape(-1)
    return math.exp(-logp[targets].mean().item())


def train_model(model, train_wins: torch.Tensor, r: TinyRecipe, progress: Progress | None = None) -> float:
    """AdamW with warm-up + cosine over random batches of windows; returns the final smoothed loss."""
    gen = torch.Generator().manual_seed(r.seed)
    opt = make_optimizer(model, r.lr, r.weight_decay)
    schedule = make_scheduler(opt, r.steps, r.warmup)
    model.train()
    ema = None
    order = torch.randperm(train_wins.shape[0], generator=gen)
    pos = 0
    for step in range(r.steps):
        if pos + r.batch_size > order.numel():  # next epoch, reshuffled
            order, pos = torch.randperm(train_wins.shape[0], generator=gen), 0
        x = train_wins[order[pos:pos + r.batch_size]]  # [B, L]
        pos += r.batch_size
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        emit(progress, "building builtin model", step + 1, r.steps, loss=ema)
    model.eval()
    return float(ema)


def build(name: str = "tiny", out: Path | None = None, progress: Progress | None = None,
          recipe: TinyRecipe | None = None, force: bool = False) -> BuildReport:
    """Build (train) a builtin model into `out` (default: the cache) and return what was measured."""
    from transformers import LlamaForCausalLM

    r = recipe or get_recipe(name)
    out = Path(out) if out else builtin_dir(r.name)
    t0 = time.perf_counter()
    torch.manual_seed(r.seed)
    tokenizer = train_tokenizer(corpus.split_texts("train"), r.vocab_size)
    train_stream = token_stream(corpus.split_texts("train"), tokenizer)
    test_wins = windows(token_stream(corpus.split_texts("test"), tokenizer), r.seq_len)
    model = LlamaForCausalLM(r.llama_config())
    final_loss = float("nan")
    if r.trainable:
        final_loss = train_model(model, windows(train_stream, r.seq_len), r, progress)
    model.eval()
    ppl = perplexity(model, test_wins, batch_size=16)
    uni = unigram_perplexity(train_stream, test_wins, r.vocab_size)
    report = BuildReport(r.name, str(out), sum(p.numel() for p in model.parameters()), r.steps if r.trainable else 0,
                         train_stream.numel(), final_loss, test_wins[:, 1:].numel(), ppl, uni,
                         time.perf_counter() - t0)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, "builtin", {
            "builtin": {"name": r.name, "key": recipe_key(r), "recipe": asdict(r),
                        "corpus": corpus.corpus_fingerprint(), "torch": torch.__version__},
            "metrics": {k: v for k, v in asdict(report).items() if k not in ("name", "path")},
        })
    return report


def ensure_built(name: str, progress: Progress | None = None) -> Path:
    """Path of a builtin model, building it first when missing or built from another recipe."""
    get_recipe(name)
    if not is_built(name):
        build(name, progress=progress)
    return builtin_dir(name)

