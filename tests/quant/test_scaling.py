"""AWQ and SmoothQuant: folding scales leaves the float function unchanged (float64), and the searches
never do worse than plain RTN on what they measure."""

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from llmopt.errors import LlmoptError
from llmopt.quant import awq
from llmopt.families.registry import fold_scales, scale_groups
from llmopt.quant.rtn import fake_quantize_activations, rtn_quantize
from llmopt.quant.smoothquant import ActMaxAccumulator, smooth_scales
from llmopt.checkpoint.types import QuantArgs


def _layer(kind: str, kv_heads: int):
    cfg_cls, layer_cls = {"llama": (LlamaConfig, LlamaDecoderLayer), "qwen2": (Qwen2Config, Qwen2DecoderLayer)}[kind]
    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=kv_heads,
                  head_dim=16, num_hidden_layers=1, vocab_size=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = layer_cls(cfg, 0).double().eval()
    with torch.no_grad():
        for p in layer.parameters():  # non-trivial norms and biases so folding has something to get wrong
            p.add_(torch.randn_like(p) * 0.1)
    return cfg, layer


def _run(cfg, layer, x):
    rope = LlamaRotaryEmbedding(cfg).double()
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    cos_sin = rope(x, pos)
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf"), dtype=x.dtype).triu(1)[None, None]
    out = layer(x, attention_mask=mask, position_embeddings=cos_sin, position_ids=pos)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind,kv", [("llama", 4), ("llama", 2), ("qwen2", 2), ("qwen2", 4)])
def test_folded_scales_leave_function_unchanged(kind, kv):
    cfg, layer = _layer(kind, kv)
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    ref = _run(cfg, layer, x)
    groups = scale_groups(layer, cfg)
    assert any(g.prev == "self_attn.v_proj" for g in groups) == (kv == 4)  # o_proj only without GQA
    for g in groups:
        n_in = layer.get_submodule(g.linears[0]).in_features
        fold_scales(layer, g, torch.rand(n_in, dtype=torch.float64) * 4 + 0.1)
    assert torch.allclose(_run(cfg, layer, x), ref, rtol=1e-10, atol=1e-10)


def test_unsupported_family_refused():
    cfg, layer = _layer("llama", 2)
    cfg.model_type = "bloom"  # not in the family registry
    with pytest.raises(LlmoptError, match="gptq or rtn"):
        scale_groups(layer, cfg)


def _outlier_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :4] *= 40  # a few outlier channels, as in LLM activations
    return x


def test_smoothquant_scales_reduce_w8a8_error_and_keep_function():
    x = _outlier_inputs()
    w = torch.randn(96, 128) * 0.05
    acc = ActMaxAccumulator(128, x.device)
    acc.add(x)
    assert torch.equal(acc.amax, x.abs().amax(0))
    s = smooth_scales(acc.amax, [w], alpha=0.5)
    xd, wd, sd = x.double(), w.double(), s.double()
    assert torch.allclose((xd / sd) @ (wd * sd).t(), xd @ wd.t(), rtol=1e-10, atol=1e-10)  # function unchanged
    args = QuantArgs(bits=8, group_size=-1, sym=True)

    def w8a8_err(xs, ws):
        y = fake_quantize_activations(xs, 8) @ rtn_quantize(ws, args).dequantize().t()
        return (y - x @ w.t()).pow(2).mean().item()

    assert w8a8_err(x / s, w * s) < 0.5 * w8a8_err(x, w)


def test_awq_scale_search_not_worse_than_rtn():
    x = _outlier_inputs(d=128)
    ws = [torch.randn(64, 128), torch.randn(32, 128)]
    stats = awq.AwqStats(128, 32, x.shape[0], x.device)
    for chunk in x.split(300):
        stats.add(chunk)
    assert torch.allclose(stats.mean_abs(), x.abs().mean(0), rtol=1e-5)
    assert stats.tokens().shape[0] == min(x.shape[0], awq.SEARCH_TOKENS)
    args = QuantArgs(bits=4, group_size=32, sym=False)
    s, alpha, loss, rtn_loss = awq.search_scales(stats.tokens(), stats.mean_abs(), ws, args)
    assert loss <= rtn_loss and alpha > 0 and loss < 0.9 * rtn_loss  # outliers: scaling must pay off
    gram = stats.gram_blocks()
    g = x.view(-1, 4, 32).transpose(0, 1)
    assert torch.allclose(gram, (g.transpose(1, 2) @ g).double().float() / x.shape[0], rtol=1e-4, atol=1e-4)


def test_awq_clip_search_lowers_group_error():
    x = _outlier_inputs(d=64, seed=3)
    w = torch.randn(16, 64)
    w[:, 7] *= 8  # a weight outlier that RTN's range wastes levels on
    args = QuantArgs(bits=4, group_size=16, sym=False)
    stats = awq.AwqStats(64, 16, x.shape[0], x.device)
    stats.add(x)
    clip = awq.search_clip(w, stats.gram_blocks(), args)
    assert ((clip > 0.5) & (clip <= 1)).all()

    def err(qw):
        return (x @ (qw.dequantize() - w).t()).pow(2).mean().item()

    assert err(awq.awq_quantize(w, stats.gram_blocks(), args)) <= err(rtn_quantize(w, args)) + 1e-9


def test_awq_search_loss_equals_direct_float64(monkeypatch):
    """The compressed-sample loss is the mean squared output error over the full sample (float64 reference)."""
    monkeypatch.setattr(awq, "ranking_dtype", lambda device: torch.float32)
    x = _outlier_inputs(d=64, seed=5)[:500]  # S=500 > in=64: the QR path
    w = torch.randn(48, 64)
    args = QuantArgs(bits=4, group_size=16, sym=False, awq_grid=5)
    s, alpha, loss, rtn_loss = awq.search_scales(x, x.abs().mean(0), [w], args)
    wq = awq._rtn_fake(w * s, args) / s
    direct = (x.double() @ (wq.double() - w.double()).t()).pow(2).mean().item()
    assert abs(loss - direct) <= 1e-5 * direct
    w_rtn = awq._rtn_fake(w, args)  # α = 0: s = 1
    direct_rtn = (x.double() @ (w_rtn.double() - w.double()).t()).pow(2).mean().item()
    assert abs(rtn_loss - direct_rtn) <= 1e-5 * direct_rtn
    r = awq.compress_sample(x)
    assert r.shape == (64, 64)
    assert torch.allclose(r.double().t() @ r.double(), x.double().t() @ x.double(), rtol=1e-4, atol=1e-3)


def test_awq_clip_search_matches_float64_brute_force():
    x = _outlier_inputs(d=64, seed=4)[:400]
    w = torch.randn(40, 64)
    args = QuantArgs(bits=4, group_size=16, sym=False, awq_grid=8)
    stats = awq.AwqStats(64, 16, x.shape[0], x.device)
    stats.add(x)
    gram = stats.gram_blocks().double()
    clip = awq.search_clip(w, stats.gram_blocks(), args, chunk=7)  # a chunk that does not divide out
    wg = w.double().view(40, 4, 16)
    errs = []
    ratios = [1 - awq.CLIP_MAX_SHRINK * k / args.awq_grid for k in range(args.awq_grid)]
    for r in ratios:
        from llmopt.quant.rtn import fake_quantize, params_from_range

        s, z = params_from_range(wg.amin(-1) * r, wg.amax(-1) * r, 4, False)
        d = fake_quantize(wg, s.unsqueeze(-1), z.unsqueeze(-1), 4) - wg
        errs.append(torch.einsum("cgi,gij,cgj->cg", d, gram, d))
    best = torch.stack(errs).argmin(0)  # [out, G]
    expected = torch.tensor(ratios, dtype=torch.float32)[best]
    agree = (clip == expected).float().mean().item()
    assert agree > 0.97  # float32 vs float64 may flip exact near-ties only


def test_awq_bf16_ranking_picks_a_near_best_alpha():
    """Where the search ranks in bf16, its pick's true (float64) loss is within 0.2% of the grid's best."""
    for seed in range(4):
        x = _outlier_inputs(d=128, seed=seed)[:1500]
        ws = [torch.randn(96, 128)]
        args = QuantArgs(bits=4, group_size=32, sym=False, awq_grid=20)
        s, alpha, _, _ = awq.search_scales(x, x.abs().mean(0), ws, args)
        xm = x.abs().mean(0).clamp(min=1e-4)

        def true_loss(a: float) -> float:
            sc = xm.pow(a)
            sc = sc / (sc.max() * sc.min()).sqrt()
            d = awq._rtn_fake(ws[0] * sc, args) / sc - ws[0]
            return (x.double() @ d.double().t()).pow(2).mean().item()

        best = min(true_loss(k / 20) for k in range(20))
        assert true_loss(alpha) <= 1.002 * best


def test_awq_search_in_row_chunks_gives_the_same_losses(monkeypatch):
    """The scale search evaluates weight rows in chunks (MoE blocks stack every expert): same α and losses."""
    monkeypatch.setattr(awq, "ranking_dtype", lambda device: torch.float32)
    x = _outlier_inputs(d=64, seed=6)[:300]
    ws = [torch.randn(40, 64), torch.randn(24, 64)]
    args = QuantArgs(bits=4, group_size=16, sym=False, awq_grid=6)
    whole = awq.search_scales(x, x.abs().mean(0), ws, args)
    monkeypatch.setattr(awq, "SEARCH_ROWS", 7)  # chunks that split both weights unevenly
    chunked = awq.search_scales(x, x.abs().mean(0), ws, args)
    assert torch.equal(whole[0], chunked[0]) and whole[1] == chunked[1]
    assert abs(whole[2] - chunked[2]) <= 1e-6 * whole[2] and abs(whole[3] - chunked[3]) <= 1e-6 * whole[3]
