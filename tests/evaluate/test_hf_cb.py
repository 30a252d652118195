"""`--engine hf-cb`: transformers' continuous batching as a cross-check of llmopt's engine."""

import json

import torch
from typer.testing import CliRunner

from llmopt.cli.main import app
from llmopt.evaluate.hf_cb import run_hf_cb
from llmopt.evaluate.perf import Sampling, run_hf
from llmopt.evaluate.workload import Request
from llmopt.models import ModelSpec, load_model


def test_greedy_tokens_equal_generate_and_every_token_stamped(tiny_model_dir):
    model = load_model(ModelSpec(str(tiny_model_dir), "cpu", "float32")).model
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    reqs = [Request(torch.randint(0, vocab, (n,), generator=g).tolist(), m, 0.0)
            for n, m in ((5, 6), (17, 3), (9, 9), (30, 4), (12, 7))]  # mixed lengths, one batch
    cb = run_hf_cb(model, reqs, Sampling(), block_size=8)
    ref = run_hf(model, reqs, Sampling(), pad_id=None)
    assert cb.outputs == ref.outputs
    assert [len(o) for o in cb.outputs] == [r.max_tokens for r in reqs]  # EOS ignored: exact lengths
    m = cb.metrics
    assert m.output_tokens == sum(r.max_tokens for r in reqs) and m.ttft_ms.p50 > 0 and m.tpot_ms.p50 > 0


def test_cli_hf_cb_perf_only(tiny_model_dir, tmp_path):
    j = tmp_path / "cb.json"
    r = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--engine", "hf-cb", "--perf-only", "--num-requests", "4",
                                 "--prompt-len", "8:24", "--output-len", "4:8", "--repeats", "1", "--threads", "1",
                                 "--json", str(j)])
    assert r.exit_code == 0, r.output
    e = json.loads(j.read_text())["results"][0]
    assert e["perf"]["engine"] == "hf-cb" and e["perf"]["output_tokens_per_s"] > 0
    r = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--engine", "hf-cb", "--temperature", "0.7"])
    assert r.exit_code == 2 and "greedy" in r.output


def test_config_keywords_follow_the_installed_transformers():
    """transformers ≤ 5.1x names the page size `block_size` and has no `auto_switch_to_flash` (5.17 on the GPU
    machine refused `page_size`); newer ones take `page_size` (and still accept `block_size` as an alias)."""
    from dataclasses import dataclass

    from llmopt.evaluate.hf_cb import _cb_kwargs

    @dataclass
    class Old:
        block_size: int = 256
        num_blocks: int | None = None

    @dataclass
    class New:
        page_size: int = 256
        num_blocks: int | None = None
        auto_switch_to_flash: bool = True
        block_size: int | None = None

    assert _cb_kwargs(Old, 16, num_blocks=4) == {"block_size": 16, "num_blocks": 4}
    assert _cb_kwargs(New, 16, num_blocks=4) == {"page_size": 16, "num_blocks": 4, "auto_switch_to_flash": False}
    assert Old(**_cb_kwargs(Old, 16)).block_size == 16 and New(**_cb_kwargs(New, 16)).page_size == 16
