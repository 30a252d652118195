"""Generations on a prompt set through llmopt's engine, scored for refusals, answers and agreement.

Every model gets the same prompts, the same sampling parameters per (prompt, sample) — seed `seed + i·N + s` for
sample s of prompt i with N samples per prompt — so sample s of a compressed model is paired with sample s of the
baseline. Greedy by default; generation stops at EOS or `--gen-tokens`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from llmopt.engine import EngineConfig, LLMEngine, SamplingParams
from llmopt.engine.block_manager import blocks_for
from llmopt.errors import LlmoptError
from llmopt.evaluate.perf import Sampling
from llmopt.evaluate.prompts import PromptSet
from llmopt.evaluate.refusal import RefusalDetector
from llmopt.evaluate.text_metrics import (
    Flip,
    Scored,
    answer_contains,
    answer_exact,
    summarize_generations,
)


@dataclass(frozen=True, slots=True)
class Generated:
    text: str  # decoded, special tokens skipped
    tokens: int


# User prompts and their sampling params → one generation each (llmopt's engine, or a stub in tests).
TextGenerator = Callable[[list[str], list[SamplingParams]], list[Generated]]


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    gen_tokens: int = 64
    samples_per_prompt: int = 1
    sampling: Sampling = Sampling()  # the eval's --temperature/--top-k/--top-p/--seed, as the workload uses them

    def __post_init__(self) -> None:
        if self.gen_tokens < 1:
            raise LlmoptError(f"--gen-tokens must be ≥ 1 (got {self.gen_tokens})")
        if self.samples_per_prompt < 1:
            raise LlmoptError(f"--samples-per-prompt must be ≥ 1 (got {self.samples_per_prompt})")
        if self.samples_per_prompt > 1 and self.sampling.temperature == 0:
            raise LlmoptError("--samples-per-prompt > 1 needs --temperature > 0: greedy samples are all the same")

    def params(self, prompt_index: int, sample: int) -> SamplingParams:
        s = self.sampling
        seed = s.seed + prompt_index * self.samples_per_prompt + sample
        return SamplingParams(self.gen_tokens, s.temperature, s.top_k, s.top_p, seed)


@dataclass(slots=True)
class ModelGenerations:
    """One model's scored generations, in (prompt, sample) order."""

    scored: list[Scored]
    judge_unparsed: int | None = None


def generate_and_score(prompts: PromptSet, generate: TextGenerator, detector: RefusalDetector,
                       settings: GenerationSettings) -> ModelGenerations:
    """Every prompt × sample through `generate`, each generation judged by `detector` and checked against the
    prompt's accepted answers."""
    pairs = [(i, s) for i in range(len(prompts.items)) for s in range(settings.samples_per_prompt)]
    outputs = generate([prompts.items[i].prompt for i, _ in pairs], [settings.params(i, s) for i, s in pairs])
    refused = detector.judge([prompts.items[i].prompt for i, _ in pairs], [o.text for o in outputs])
    scored = []
    for (i, s), out, r in zip(pairs, outputs, refused):
        item = prompts.items[i]
        has = bool(item.answers)
        scored.append(Scored(i, s, item.category, out.text, r, answer_contains(out.text, item.answers) if has else None,
                             answer_exact(out.text, item.answers) if has else None, out.tokens))
    return ModelGenerations(scored, detector.unparsed)


def report(gens: ModelGenerations, baseline: ModelGenerations | None, prompts: PromptSet,
           settings: GenerationSettings, detector: RefusalDetector, chat_template: bool) -> tuple[dict, list[Flip]]:
    """quality.generation of the eval report, and the flips against the baseline."""
    summary, flips = summarize_generations(gens.scored, baseline.scored if baseline is not None else None)
    out = {"prompts": len(prompts.items), "prompt_set": prompts.source,
           "samples_per_prompt": settings.samples_per_prompt, "gen_tokens": settings.gen_tokens,
           "detector": detector.name, "chat_template": chat_template}
    out |= asdict(summary)
    out["judge_unparsed"] = gens.judge_unparsed
    return out, flips


def flip_records(model: str, flips: list[Flip], prompts: PromptSet) -> list[dict]:
    """The flips file's lines: which prompt, what the baseline and this model answered, both verdicts."""
    return [{"model": model, "kind": f.kind, "prompt_index": f.prompt_index, "sample": f.sample,
             "category": f.category, "prompt": prompts.items[f.prompt_index].prompt,
             "answers": list(prompts.items[f.prompt_index].answers), "baseline_verdict": f.baseline_verdict,
             "verdict": f.verdict, "baseline_output": f.baseline_text, "output": f.text} for f in flips]


def render(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    """Prompt token ids: inside the chat template when asked and the tokenizer has one, else the plain text with
    the tokenizer's own special tokens (BOS where it adds one)."""
    if chat_template and uses_chat_template(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_fits(prompts: list[str], tokenizer, chat_template: bool, gen_tokens: int, context: int, name: str,
               option: str = "--gen-tokens") -> None:
    """Fail before anything runs when the longest prompt plus its generation exceeds the model's context."""
    longest = max(len(render(tokenizer, p, chat_template)) for p in prompts)
    if longest + gen_tokens > context:
        raise LlmoptError(f"the longest prompt ({longest} tokens) plus {option} ({gen_tokens}) exceeds {name}'s "
                          f"maximum context of {context}: shorten the prompts or lower --gen-tokens")


def engine_generator(model, tokenizer, kv_budget: int, block_size: int, max_prefill_tokens: int, max_num_seqs: int,
                     chat_template: bool, kv_dtype: str = "auto", decode_attention: str = "auto") -> TextGenerator:
    """A TextGenerator over llmopt's engine: all prompts at once (continuous batching), stopping at EOS."""

    def generate(prompts: list[str], params: list[SamplingParams]) -> list[Generated]:
        ids = [render(tokenizer, p, chat_template) for p in prompts]
        config = EngineConfig(kv_budget, block_size, max_prefill_tokens, max_num_seqs,
                              max_blocks=sum(blocks_for(len(x) + sp.max_tokens, block_size)
                                             for x, sp in zip(ids, params)), kv_dtype=kv_dtype,
                              decode_attention=decode_attention)
        engine = LLMEngine(model, config, tokenizer.eos_token_id)
        for x, sp in zip(ids, params):
            engine.add(x, sp)
        seqs = engine.run()
        return [Generated(tokenizer.decode(s.output, skip_special_tokens=True), len(s.output)) for s in seqs]

    return generate
