"""`llmopt models`: build the builtin models, print facts about any model."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Annotated

import typer
from rich.table import Table

from llmopt.cli import options as opt
from llmopt.cli.console import out
from llmopt.errors import CheckFailed, LlmoptError

app = typer.Typer(no_args_is_help=True, help="Build the builtin models; show a model's shapes, weight and KV-cache bytes.")


@app.command("build")
def build(
    name: Annotated[str, typer.Argument(help="Builtin model to build: tiny (tiny-student is an untrained config).")] = "tiny",
    seed: opt.Seed = 0,
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (default: the recipe's).")] = None,
    min_ratio: Annotated[float, typer.Option(
        "--min-ratio", help="Fail (exit 1) unless unigram perplexity / model perplexity reaches this.")] = 5.0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if this exact build is cached.")] = False,
) -> None:
    """Train a builtin model offline on the builtin corpus and cache it (LLMOPT_HOME, default ~/.cache/llmopt).

    A cached build of the same recipe, corpus and torch is reused (its recorded figures are shown) unless --force.
    """
    from llmopt.cli.progress import bars
    from llmopt.models.builtin import build as build_model
    from llmopt.models.builtin import cached_report, get_recipe

    name = name.removeprefix("builtin:")
    recipe = get_recipe(name)
    if steps is not None and steps <= 0:
        raise LlmoptError("--steps must be positive")
    recipe = replace(recipe, seed=seed, steps=steps or recipe.steps)
    report = None if force else cached_report(recipe)
    cached = report is not None
    if report is None:
        with bars() as progress:
            report = build_model(name, progress=progress, recipe=recipe)
    t = Table(title=f"builtin:{name}" + (" (cached build)" if cached else ""), show_header=False)
    t.add_row("path", report.path)
    t.add_row("parameters", f"{report.params:,}")
    t.add_row("train tokens / steps", f"{report.train_tokens:,} / {report.steps}")
    t.add_row("held-out tokens", f"{report.test_tokens:,}")
    t.add_row("held-out perplexity", f"{report.perplexity:.2f}")
    t.add_row("unigram perplexity", f"{report.unigram_perplexity:.2f}")
    t.add_row("unigram / model", f"{report.ratio:.2f}×")
    t.add_row("build time", f"{report.seconds:.1f} s")
    out.print(t)
    if recipe.trainable and report.ratio < min_ratio:
        raise CheckFailed(f"builtin:{name} reached only {report.ratio:.2f}× below unigram perplexity "
                          f"(--min-ratio {min_ratio}): train longer with --steps")


@app.command("info")
def info(
    model: Annotated[str, typer.Argument(help="Hub id, local checkpoint dir, or builtin:tiny.")],
    context: Annotated[int, typer.Option("--context", help="Tokens per sequence for the KV-cache size.")] = 4096,
    batch: Annotated[int, typer.Option("--batch", help="Sequences for the KV-cache size.")] = 1,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    trust_remote_code: opt.TrustRemoteCode = False,
    revision: opt.Revision = None,
    as_json: opt.Json = False,
) -> None:
    """Parameters, layers, heads, weight bytes and KV-cache bytes (layers·tokens·kv_heads·(k+v head dims)·bytes).

    Sliding-window layers are counted apart and hold at most `window` tokens; MLA models show both the
    decompressed K/V llmopt's engine caches and the latent (kv_lora_rank + qk_rope_head_dim) vLLM caches.
    """
    from llmopt.models import (
        ModelSpec,
        check_weights,
        load_config,
        model_info,
        resolve_path,
    )
    from llmopt.utils import resolve_device, resolve_dtype

    if context <= 0 or batch <= 0:
        raise LlmoptError("--context and --batch must be positive")
    spec = ModelSpec(model, device, dtype, trust_remote_code, revision)
    path = resolve_path(spec)
    config = load_config(path, trust_remote_code)
    check_weights(path)  # a truncated or garbled shard fails here, not as a library traceback later
    mi = model_info(model, path, config, resolve_dtype(dtype, resolve_device(device)), context, batch)
    methods, engine = _support(config)
    if as_json:
        out.print_json(json.dumps({**asdict(mi), "supported": {"methods": methods, "engine": engine}}))
        return
    t = Table(title=model, show_header=False)
    for key, label, fmt in [
        ("architecture", "architecture", str), ("params", "parameters", "{:,}".format),
        ("layers", "layers", str), ("heads", "attention heads", str), ("kv_heads", "kv heads", str),
        ("head_dim", "head dim", str), ("hidden_size", "hidden size", str), ("vocab_size", "vocab", "{:,}".format),
        ("dtype", "dtype", str), ("quantization", "quantization", lambda v: v or "none"),
        ("weight_bytes", "weight bytes", _bytes),
    ]:
        t.add_row(label, fmt(getattr(mi, key)))
    if mi.k_head_dim != mi.v_head_dim:
        t.add_row("cached K / V head dim", f"{mi.k_head_dim} / {mi.v_head_dim} (MLA, decompressed)")
    t.add_row("full-attention layers", f"{mi.full_layers} × {_bytes(mi.kv_bytes_per_token_layer)} / token")
    if mi.sliding_layers:
        t.add_row("sliding-window layers", f"{mi.sliding_layers} × {_bytes(mi.kv_bytes_per_token_layer)} / token, "
                                           f"capped at {mi.sliding_window} tokens")
    t.add_row("KV bytes / token", _bytes(mi.kv_bytes_per_token))
    t.add_row(f"KV bytes ({batch} × {context} tokens)", _bytes(mi.kv_bytes))
    if mi.latent_kv_bytes is not None:
        t.add_row("latent KV bytes / token (vLLM MLA)", _bytes(mi.latent_kv_bytes_per_token))
        t.add_row(f"latent KV bytes ({batch} × {context} tokens)", _bytes(mi.latent_kv_bytes))
    t.add_row("quantize methods", ", ".join(methods))
    t.add_row("llmopt engine", engine)
    out.print(t)


def _support(config) -> tuple[list[str], str]:
    """The quantize methods that run on this architecture, and what llmopt's engine makes of it: the engine's own
    one-token probe forward, run here on the meta device (no weights), decides when it can run there; a model
    the meta device cannot run (MoE routing needs values) is judged by whether its family is in the registry."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmopt.engine.model_runner import inspect_attention
    from llmopt.families import registry

    methods = registry.supported_methods(config)
    family = registry.family(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        specs = inspect_attention(model)
    except LlmoptError as e:
        if e.__cause__ is None:  # a refusal the probe decided, not a forward the meta device could not run
            return methods, f"refused: {e}"
        specs = None
    except Exception:  # noqa: BLE001 - the meta device cannot run every forward; the engine probes again at start
        specs = None
    if specs is None:
        return methods, ("served: a registry family, tested greedy-equal to generate (its layers are probed "
                         "when the engine starts)" if family is not None
                         else "decided by a probe forward when the engine starts")
    kinds = sorted({"full" if s.window is None else f"sliding {s.window}" for s in specs})
    extra = [", softcap"] if any(s.softcap for s in specs) else []
    mla = [", MLA (decompressed K/V)"] if any(s.k_head_dim != s.v_head_dim for s in specs) else []
    return methods, f"served: {' + '.join(kinds)} attention" + "".join(extra + mla)


def _bytes(n: int) -> str:
    """'1.50 MiB (1,572,864 B)': human size next to the exact count."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n:,} B" if unit == "B" else f"{size:,.2f} {unit} ({n:,} B)"
