"""The per-model eval loop behind `evaluate()` (llmopt/evaluate/api.py): checks everything up front, then quality, perf, memory."""

from __future__ import annotations

from pathlib import Path

import torch

from llmopt.calibration.data import DataSpec, load_texts, token_stream
from llmopt.engine import SamplingParams
from llmopt.engine.engine import model_dtype
from llmopt.engine.kv_format import resolve_kv_format
from llmopt.errors import LlmoptError
from llmopt.evaluate.budget import parse_kv_budget
from llmopt.evaluate.engines import EngineContext, build_engine, check_engine
from llmopt.evaluate.generation import (
    ModelGenerations,
    check_fits,
    engine_generator,
    flip_records,
    generate_and_score,
    uses_chat_template,
)
from llmopt.evaluate.generation import report as generation_report
from llmopt.evaluate.kv_quality import measure_kv_quality
from llmopt.evaluate.metrics import cost_per_1k_output_tokens, summarize
from llmopt.evaluate.perf import warmup_requests
from llmopt.evaluate.prompts import PromptSet, load_prompts
from llmopt.evaluate.quality import Quality, measure_quality, sliding_windows
from llmopt.evaluate.refusal import (
    JUDGE_PROMPT,
    JUDGE_TOKENS,
    JudgeDetector,
    PhraseDetector,
    RefusalDetector,
    load_patterns,
)
from llmopt.evaluate.types import EvalArgs, ModelReport
from llmopt.evaluate.utilization import UtilizationSampler
from llmopt.evaluate.workload import make_workload
from llmopt.models import (
    ModelSpec,
    attention_shape,
    check_seq_len,
    kv_bytes,
    load_config,
    load_model,
    load_tokenizer,
    max_context,
    resolve_path,
)
from llmopt.progress import Counter, Progress
from llmopt.runtime import weight_bytes


def _score_fields(q: Quality, has_baseline: bool, is_base: bool) -> dict:
    out = {"perplexity": q.perplexity}
    if has_baseline:
        out |= ({"kld_mean": 0.0, "kld_p99": 0.0, "top1_agreement": 1.0} if is_base else
                {"kld_mean": q.kld_mean, "kld_p99": q.kld_p99, "top1_agreement": q.top1_agreement})
    return out


def method_of(loaded) -> str:
    meta = loaded.meta or {}
    if isinstance(meta.get("method"), str):
        return meta["method"]
    q = loaded.quantization
    if q:
        return str(q.get("quant_method") or q.get("format") or "quantized")
    return "distilled" if meta.get("kind") == "distill" else "float"


class EvalRunner:
    def __init__(self, args: EvalArgs, progress: Progress | None = None) -> None:
        self.args = args
        self.progress = progress
        names = list(dict.fromkeys(args.model))
        if args.baseline is not None and args.baseline not in names:
            names.insert(0, args.baseline)
        self.names = names
        self.data = DataSpec(args.data, args.split, args.text_field)
        self._texts: list[str] | None = None
        self.prompt_set: PromptSet | None = None  # --prompts, read in preflight
        self.detector: RefusalDetector | None = None
        self.generations: list[dict] = []  # every model's generations, for STEM.generations.jsonl
        self.flips: list[dict] = []
        self._base_generations: ModelGenerations | None = None

    def _spec(self, name: str) -> ModelSpec:
        a = self.args
        return ModelSpec(name, a.device, a.dtype, a.trust_remote_code)

    @property
    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = load_texts(self.data, "test")
        return self._texts

    def preflight(self) -> None:
        """Every check that can fail, before any model runs: paths, tokenizers, context lengths, data."""
        a = self.args
        toks, configs = {}, {}
        for name in self.names + ([a.draft] if a.draft else []):
            path = resolve_path(self._spec(name))
            configs[name] = load_config(path, a.trust_remote_code)
            toks[name] = load_tokenizer(path, a.trust_remote_code)
        if a.baseline is not None and not a.perf_only:
            for name in self.names:
                if toks[name].get_vocab() != toks[a.baseline].get_vocab():
                    raise LlmoptError(f"the tokenizer of {name} differs from the baseline's ({a.baseline}): KL-divergence "
                                      f"and top-1 agreement need the same tokens; drop --baseline or compare models "
                                      f"that share a tokenizer")
        if a.draft:
            for name in self.names:
                if toks[name].get_vocab() != toks[a.draft].get_vocab():
                    raise LlmoptError(f"the draft {a.draft} has a different tokenizer than {name}: a speculative "
                                      f"draft must share the target's tokenizer")
        check_engine(a.engine, a)
        spec = a.workload_spec()
        for name in self.names:
            ctx = max_context(configs[name])
            if not a.quality_only and spec.prompt_len[1] + spec.output_len[1] > ctx:
                raise LlmoptError(f"--prompt-len up to {spec.prompt_len[1]} plus --output-len up to "
                                  f"{spec.output_len[1]} exceeds {name}'s maximum context of {ctx}: shorten them")
            if not a.perf_only:
                check_seq_len(configs[name], "--seq-len", a.seq_len, name)
        if a.prompts is not None:
            self.prompt_set = load_prompts(a.prompts)
            prompts = [item.prompt for item in self.prompt_set.items]
            for name in self.names:
                check_fits(prompts, toks[name], a.chat_template, a.gen_tokens, max_context(configs[name]), name)
            if a.refusal_patterns:
                self.detector = PhraseDetector(load_patterns(a.refusal_patterns), f"phrases:{a.refusal_patterns}")
            elif a.refusal_judge:
                self._check_judge(prompts)
            else:
                self.detector = PhraseDetector()
        _ = self.texts  # load the eval data now: a bad --data fails before any model loads

    def _check_judge(self, prompts: list[str]) -> None:
        """The judge must load its tokenizer and hold a judge prompt with a whole generation in its context."""
        a = self.args
        try:
            path = resolve_path(self._spec(a.refusal_judge))
            config = load_config(path, a.trust_remote_code)
            tok = load_tokenizer(path, a.trust_remote_code)
        except LlmoptError as e:
            raise LlmoptError(f"--refusal-judge {a.refusal_judge}: {e}") from None
        # A generation of --gen-tokens tokens takes at most about as many judge tokens plus a few (its tokenizer
        # may differ): check the longest prompt inside the judge prompt with that allowance.
        judge_prompts = [JUDGE_PROMPT.format(prompt=p, response="") for p in prompts]
        check_fits(judge_prompts, tok, True, 2 * a.gen_tokens + JUDGE_TOKENS, max_context(config),
                   f"the judge {a.refusal_judge}", "the response allowance (2 × --gen-tokens + 4)")

    def run_all(self) -> list[ModelReport]:
        a = self.args
        baseline = None
        if a.baseline is not None and not a.perf_only:
            baseline = load_model(self._spec(a.baseline))
        draft = load_model(self._spec(a.draft)).model if a.draft and not a.quality_only else None
        if a.refusal_judge and self.prompt_set is not None:
            self.detector = self._judge(load_model(self._spec(a.refusal_judge)))
        reports = []
        for name in self.names:
            loaded = baseline if (baseline is not None and name == a.baseline) else load_model(self._spec(name))
            reports.append(self.run_one(name, loaded, baseline, draft))
            if loaded is not baseline:
                del loaded
        return reports

    def run_one(self, name: str, loaded, baseline, draft) -> ModelReport:
        a = self.args
        quality = {"perplexity": None, "kld_mean": None, "kld_p99": None, "top1_agreement": None, "tasks": None,
                   "generation": None}
        if not a.perf_only:
            quality.update(self.quality(name, loaded, baseline))
        perf = {"engine": a.engine, "threads": torch.get_num_threads(), "repeats": None,
                "output_tokens_per_s": None, "total_tokens_per_s": None, "requests_per_s": None,
                "ttft_ms": None, "tpot_ms": None, "itl_ms": None, "e2el_ms": None,
                "cost_per_1k_output_tokens": None, "utilization": None, "attention": None}
        memory = {"weight_bytes": weight_bytes(loaded.model), "kv_bytes_allocated": None, "kv_bytes_formula": None,
                  "kv_waste_bytes": None}
        if a.engine == "llamacpp":  # llama.cpp maps the GGUF file: its bytes are the weights it serves
            from llmopt.evaluate.engines.llamacpp import gguf_file

            memory |= {"checkpoint_weight_bytes": memory["weight_bytes"],
                       "weight_bytes": gguf_file(Path(loaded.path)).stat().st_size}
        speculative = None
        if not a.quality_only:
            perf_d, mem_d, speculative = self.perf(name, loaded, draft)
            perf.update(perf_d)
            memory.update(mem_d)
        return ModelReport(name, method_of(loaded), quality, perf, memory, speculative)

    def quality(self, name: str, loaded, baseline) -> dict:
        a = self.args
        stream = token_stream(self.texts, loaded.tokenizer)[: a.quality_tokens]
        sw = sliding_windows(stream, a.seq_len, a.stride or max(1, a.seq_len // 2))
        phase = Counter(self.progress, f"quality {name}", 1)
        is_base = baseline is not None and loaded is baseline
        q: Quality = measure_quality(loaded.model, sw.windows, None if (baseline is None or is_base) else baseline.model,
                                     scored=sw.scored)
        phase.advance()
        out = {"tokens": q.tokens, "seq_len": a.seq_len, "stride": a.stride or max(1, a.seq_len // 2)}
        # The baseline against itself: KL is 0 and top-1 agreement 1 by definition.
        out |= _score_fields(q, baseline is not None, is_base)
        if a.engine == "llamacpp":  # what llama.cpp serves is the GGUF file: its scores lead, the checkpoint's stay
            from llmopt.evaluate.engines.llamacpp import GGUFScorer, gguf_file

            phase = Counter(self.progress, f"quality {name} (llama.cpp, GGUF)", 1)
            scorer = GGUFScorer(gguf_file(Path(loaded.path)), a.seq_len, a.threads, a.seed)
            g = measure_quality(None, sw.windows, None if baseline is None else baseline.model, scored=sw.scored,
                                logits_of=scorer)
            phase.advance()
            out |= {"checkpoint": _score_fields(q, baseline is not None, is_base), "source": "gguf (llama.cpp)"}
            out |= _score_fields(g, baseline is not None, False)
        if a.engine == "llmopt" and resolve_kv_format(a.kv_dtype, model_dtype(loaded.model)).lossy_for(
                model_dtype(loaded.model)):
            out |= self.kv_quality(name, loaded.model, stream)
        if a.tasks:
            from llmopt.evaluate.lm_tasks import run_tasks

            phase = Counter(self.progress, f"lm-eval {name}", 1)
            out["tasks"] = run_tasks(loaded.model, loaded.tokenizer, list(a.tasks), a.task_limit, seed=a.seed)
            phase.advance()
        if self.prompt_set is not None:
            out["generation"] = self.generation(name, loaded, baseline)
        return out

    def kv_quality(self, name: str, model, stream: torch.Tensor) -> dict:
        """quality.kv_*: --kv-dtype KV against the model's float KV through the engine, teacher-forced over the
        held-out tokens in consecutive --seq-len windows."""
        a = self.args
        windows = [stream[i:i + a.seq_len].tolist() for i in range(0, len(stream) - a.seq_len + 1, a.seq_len)]  # [L]
        phase = Counter(self.progress, f"KV quality {name} ({a.kv_dtype})", 1)
        q = measure_kv_quality(model, windows, a.kv_dtype, block_size=a.block_size)
        phase.advance()
        return q.to_quality()

    def _judge(self, judge) -> JudgeDetector:
        """The judge LM through llmopt's engine: greedy, JUDGE_TOKENS tokens, inside its chat template if any."""
        generate = self._generator(judge, chat_template=True)

        def answers(prompts: list[str]) -> list[str]:
            return [g.text for g in generate(prompts, [SamplingParams(JUDGE_TOKENS)] * len(prompts))]

        return JudgeDetector(answers, f"judge:{self.args.refusal_judge}")

    def _generator(self, loaded, chat_template: bool, kv_dtype: str = "auto"):
        a = self.args
        return engine_generator(loaded.model, loaded.tokenizer, parse_kv_budget(a.kv_budget, loaded.device),
                                a.block_size, a.max_prefill_tokens, a.max_num_seqs, chat_template, kv_dtype,
                                a.decode_attention)

    def _generate(self, name: str, loaded) -> ModelGenerations:
        assert self.prompt_set is not None and self.detector is not None
        phase = Counter(self.progress, f"prompts {name}", 1)
        generator = self._generator(loaded, self.args.chat_template, self.args.kv_dtype)
        gens = generate_and_score(self.prompt_set, generator, self.detector, self.args.generation_settings())
        phase.advance()
        return gens

    def generation(self, name: str, loaded, baseline) -> dict:
        """quality.generation: this model's prompt-set metrics, against the baseline's generations when there is
        one (generated once, the first time a model needs them)."""
        a = self.args
        assert self.prompt_set is not None and self.detector is not None
        base = None
        if baseline is not None:
            if self._base_generations is None:
                self._base_generations = self._generate(a.baseline, baseline)
            base = self._base_generations
        gens = base if loaded is baseline else self._generate(name, loaded)
        chat = a.chat_template and uses_chat_template(loaded.tokenizer)
        out, flips = generation_report(gens, base, self.prompt_set, a.generation_settings(), self.detector, chat)
        self.flips += flip_records(name, flips, self.prompt_set)
        self.generations += [{"model": name, "prompt_index": g.prompt_index, "sample": g.sample,
                              "category": g.category, "output": g.text, "refused": g.refused, "correct": g.correct}
                             for g in gens.scored]
        return out

    def perf(self, name: str, loaded, draft) -> tuple[dict, dict, dict | None]:
        a = self.args
        requests = make_workload(token_stream(self.texts, loaded.tokenizer), a.workload_spec())
        engine = build_engine(a.engine, EngineContext(loaded, a, requests, draft))
        if a.warmup:
            engine.run(warmup_requests(requests, batched=engine.warmup_batched), None)
        with UtilizationSampler(loaded.device) as sampler:  # the timed runs only, not the warm-up
            runs = [engine.run(requests, Counter(self.progress, f"perf {name} ({a.engine}) run {i + 1}/{a.repeats}",
                                                 len(requests)))
                    for i in range(a.repeats)]
        s = summarize([r.metrics for r in runs])
        m = s.median
        perf = {"repeats": s.repeats, "output_tokens_per_s": m["output_tokens_per_s"],
                "total_tokens_per_s": m["total_tokens_per_s"], "requests_per_s": m["requests_per_s"],
                "ttft_ms": m["ttft_ms"], "tpot_ms": m["tpot_ms"], "itl_ms": m["itl_ms"], "e2el_ms": m["e2el_ms"],
                "cost_per_1k_output_tokens": cost_per_1k_output_tokens(a.price_per_hour, m["output_tokens_per_s"]),
                "num_requests": m["num_requests"], "input_tokens": m["input_tokens"],
                "output_tokens": m["output_tokens"], "duration_s": m["duration_s"], "spread": s.spread,
                "utilization": sampler.result.to_dict(),
                "attention": runs[-1].attention.to_dict() if runs[-1].attention is not None else None}
        layers, _, kv_heads, head_dim = attention_shape(loaded.model.config)
        el = loaded.model.get_input_embeddings().weight.element_size()
        kv = runs[-1].kv
        if kv is not None:
            mem = {"kv_bytes_allocated": kv.allocated_bytes, "kv_bytes_formula": kv.formula_bytes,
                   "kv_waste_bytes": kv.waste_bytes, "kv_peak_tokens": kv.peak_tokens,
                   "kv_block_size": kv.block_size, "kv_pool_bytes": kv.pool_bytes, "kv_preemptions": kv.preemptions,
                   "kv_dtype": kv.kv_dtype, "kv_scales": kv.kv_scales}
        else:  # generate's own cache is not measured; the formula for its largest request is still known
            peak = max(len(r.prompt) + r.max_tokens - 1 for r in requests)
            mem = {"kv_bytes_formula": kv_bytes(layers, kv_heads, head_dim, peak, el), "kv_peak_tokens": peak}
        spec = None
        if runs[-1].spec is not None:
            st = runs[-1].spec
            spec = {"draft": a.draft, "spec_tokens": a.spec_tokens, "acceptance_rate": st.acceptance_rate,
                    "tokens_per_step": st.tokens_per_step, "proposed": st.proposed, "accepted": st.accepted}
        return perf, mem, spec
