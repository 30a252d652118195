"""GGUF export: the blocks gguf's own reader dequantizes equal llmopt's dequantized weights (scale in fp16), the
Q/K rows are in llama.cpp's order, the metadata and tokenizer are there, and bad input fails cleanly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers.rtn import quantize_model, rtn

gguf = pytest.importorskip("gguf")

from llmopt.checkpoint.formats import write_checkpoint
from llmopt.checkpoint.formats.gguf import export_gguf, qk_row_order, tokenizer_pre
from llmopt.checkpoint.types import QuantArgs
from llmopt.cli.main import app
from tests.helpers.gguf_files import HEAD_DIM, N_HEAD, N_KV, fp16_scale_reference, gguf_name, gguf_weights, hub_rows


def _vocab_size(tokenizer_dir) -> int:
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    return max([*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])]) + 1


def _model(arch: str, vocab: int, seed: int = 0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = {"vocab_size": vocab, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": N_HEAD, "num_key_value_heads": N_KV, "max_position_embeddings": 256,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)).eval()
    return LlamaForCausalLM(LlamaConfig(**common, head_dim=HEAD_DIM, tie_word_embeddings=False)).eval()


def _write(out, model, qweights, tokenizer_dir, fmt="compressed-tensors", method="rtn", args=None):
    out.mkdir()
    write_checkpoint(fmt, model, qweights, out, args or QuantArgs(bits=4, group_size=32), method)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


EXACT = [  # bits, group size, sym, GGML type
    (4, 32, True, gguf.GGMLQuantizationType.Q4_0),
    (4, 128, True, gguf.GGMLQuantizationType.Q4_0),  # a group of 128 is four whole blocks: still exact
    (4, 64, False, gguf.GGMLQuantizationType.Q4_1),
    (8, 32, True, gguf.GGMLQuantizationType.Q8_0),
    (8, -1, True, gguf.GGMLQuantizationType.Q8_0),  # per-channel int8: one scale for every block of the row
]


@pytest.mark.parametrize("bits,group_size,sym,qtype", EXACT)
def test_exact_mappings_equal_llmopt_dequantized(tmp_path, tiny_model_dir, bits, group_size, sym, qtype):
    model = _model("llama", _vocab_size(tiny_model_dir))
    qweights = quantize_model(model, bits=bits, group_size=group_size, sym=sym)
    ckpt = _write(tmp_path / "ckpt", model, qweights, tiny_model_dir,
                  method="int8" if bits == 8 else "rtn", args=QuantArgs(bits=bits, group_size=group_size, sym=sym))
    result = export_gguf(ckpt, tmp_path / "m.gguf")
    assert not result.requantized
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    weights = gguf_weights(tmp_path / "m.gguf")
    for module, qw in qweights.items():
        name = gguf_name(module)
        assert types[name] == qtype
        torch.testing.assert_close(hub_rows(name, weights[name], "llama"), fp16_scale_reference(qw),
                                   rtol=1e-6, atol=1e-7)
    # float tensors: norms in F32 exactly, the head in F16
    sd = model.state_dict()
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    torch.testing.assert_close(weights["blk.1.ffn_norm.weight"], sd["model.layers.1.post_attention_layernorm.weight"])
    torch.testing.assert_close(weights["output.weight"], sd["lm_head.weight"].half().float())


def test_qk_row_order_is_llama_cpp_permute():
    """llama.cpp's converter: reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2) — written here
    independently of the index form the exporter uses."""
    w = torch.randn(N_KV * HEAD_DIM, 8)
    theirs = w.reshape(N_KV, 2, HEAD_DIM // 2, 8).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(w[qk_row_order(w.shape[0], N_KV)], theirs)


def test_act_order_is_requantized_close_to_target(tmp_path, tiny_model_dir):
    model = _model("llama", _vocab_size(tiny_model_dir))
    torch.manual_seed(1)
    qweights = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            n_in = m.weight.shape[1]
            g_idx = (torch.randperm(n_in) // 32).to(torch.int32)  # act-order: a block spans several groups
            qweights[name] = rtn(m.weight.detach(), 4, 32, True, g_idx=g_idx)
    ckpt = _write(tmp_path / "ckpt", model, qweights, tiny_model_dir, fmt="gptq", method="gptq",
                  args=QuantArgs(bits=4, group_size=32, act_order=True))
    result = export_gguf(ckpt, tmp_path / "m.gguf")
    assert sorted(result.requantized) == sorted(gguf_name(n) for n in qweights)
    weights = gguf_weights(tmp_path / "m.gguf")
    for module, qw in qweights.items():
        target = qw.dequantize()  # [out, in]
        got = hub_rows(gguf_name(module), weights[gguf_name(module)], "llama")
        assert ((got - target).norm() / target.norm()).item() < 0.15, module
        # never worse than llama.cpp's own Q4_0 rule (d = signed max / -8, round, clamp)
        x = target.view(target.shape[0], -1, 32)
        signed_max = x.gather(-1, x.abs().argmax(-1, keepdim=True))
        d = (signed_max / -8).half().float()
        ref = ((x / d).round().clamp(-8, 7) * d).view_as(target)
        assert (got - target).norm() <= (ref - target).norm() * 1.001, module


def test_metadata_and_tokenizer(tmp_path, tiny_model_dir):
    model = _model("llama", _vocab_size(tiny_model_dir))
    ckpt = _write(tmp_path / "ckpt", model, quantize_model(model), tiny_model_dir)
    export_gguf(ckpt, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {name: f.contents() for name, f in reader.fields.items()}
    expect = {"general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 256,
              "llama.embedding_length": 128, "llama.feed_forward_length": 256, "llama.attention.head_count": N_HEAD,
              "llama.attention.head_count_kv": N_KV, "llama.rope.dimension_count": HEAD_DIM,
              "llama.rope.freq_base": 10000.0, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True,
              "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_0)}
    for key, value in expect.items():
        assert fields[key] == pytest.approx(value) if isinstance(value, float) else fields[key] == value, key
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(model.config.rms_norm_eps)
    tok = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    tokens = fields["tokenizer.ggml.tokens"]
    assert all(tokens[i] == t for t, i in tok["model"]["vocab"].items())
    assert fields["tokenizer.ggml.merges"][0] == " ".join(tok["model"]["merges"][0])
    types = fields["tokenizer.ggml.token_type"]
    assert types[1] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL


def test_qwen2_biases_no_permutation_tied_head(tmp_path, tiny_model_dir):
    model = _model("qwen2", _vocab_size(tiny_model_dir))
    qweights = quantize_model(model)
    ckpt = _write(tmp_path / "ckpt", model, qweights, tiny_model_dir)
    export_gguf(ckpt, tmp_path / "m.gguf")
    weights = gguf_weights(tmp_path / "m.gguf")
    fields = {name: f.contents() for name, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert fields["general.architecture"] == "qwen2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # the tokenizer's regex, not the architecture's name
    torch.testing.assert_close(weights["blk.0.attn_q.weight"],
                               fp16_scale_reference(qweights["model.layers.0.self_attn.q_proj"]))
    torch.testing.assert_close(weights["blk.1.attn_k.bias"], model.model.layers[1].self_attn.k_proj.bias.detach())
    assert "output.weight" not in weights  # tied: llama.cpp reuses token_embd


LLAMA3_SPLIT = r"(?i:'s|'t)|\p{N}{1,3}| ?[^\s]+"  # the shape of Llama-3's regex (digits in runs of <= 3)
QWEN2_SPLIT = r"(?i:'s|'t)|\p{N}| ?[^\s]+"  # Qwen2's: single digits


@pytest.mark.parametrize("pre,expect", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
])
def test_tokenizer_pre_from_the_regex(pre, expect):
    assert tokenizer_pre({"pre_tokenizer": pre}) == expect


def _cli(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def test_missing_path_is_one_line_exit_2(tmp_path):
    r = _cli(tmp_path / "nope", "--out", tmp_path / "m.gguf")
    assert r.exit_code == 2 and "does not exist" in r.output and len(r.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_w8a8_cannot_map(tmp_path, tiny_model_dir):
    model = _model("llama", _vocab_size(tiny_model_dir))
    ckpt = _write(tmp_path / "ckpt", model, quantize_model(model, bits=8, group_size=-1, act_bits=8),
                  tiny_model_dir, method="w8a8", args=QuantArgs(bits=8, group_size=-1))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = _cli(ckpt, "--out", out_dir / "m.gguf")
    assert r.exit_code == 2 and "W8A8" in r.output and len(r.output.strip().splitlines()) == 1
    assert list(out_dir.iterdir()) == []


def test_3bit_checkpoint_is_refused_not_stored_at_4_bits(tmp_path, tiny_model_dir):
    model = _model("llama", _vocab_size(tiny_model_dir))
    ckpt = _write(tmp_path / "ckpt", model, quantize_model(model, bits=3, group_size=32),
                  tiny_model_dir, method="rtn", args=QuantArgs(bits=3, group_size=32))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = _cli(ckpt, "--out", out_dir / "m.gguf")
    assert r.exit_code == 2 and "3-bit codes would take 4.5 bits" in r.output
    assert len(r.output.strip().splitlines()) == 1 and list(out_dir.iterdir()) == []


def test_failure_while_writing_leaves_nothing(tmp_path, tiny_model_dir):
    """The tokenizer is read inside the file writer: its absence must not leave a half-written file."""
    model = _model("llama", _vocab_size(tiny_model_dir))
    ckpt = _write(tmp_path / "ckpt", model, quantize_model(model), tiny_model_dir)
    (ckpt / "tokenizer.json").unlink()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = _cli(ckpt, "--out", out_dir / "m.gguf")
    assert r.exit_code == 2 and "tokenizer.json" in r.output
    assert list(out_dir.iterdir()) == []
