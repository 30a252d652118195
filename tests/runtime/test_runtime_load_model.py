"""llmopt.models.load_model routes a quantized checkpoint through the runtime (tokenizer, generate, report)."""

from __future__ import annotations

import torch
from tests.helpers.rtn import quantize_model
from tests.checkpoint.formats.test_formats_roundtrip import tiny_qwen2

from llmopt.models import ModelSpec, load_model
from llmopt.checkpoint.formats import write_checkpoint
from llmopt.checkpoint.types import QuantArgs
from llmopt.runtime import kernel_report, quant_modules


def _tokenizer():
    """A word-level tokenizer over 256 ids: enough for load_model, built in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1")


def test_load_model_runs_quantized_checkpoint(tmp_path):
    model = tiny_qwen2()
    qws = quantize_model(model, 4, 32, True)
    out = tmp_path / "w4"
    out.mkdir()
    write_checkpoint("gptq", model, qws, out, QuantArgs(bits=4, group_size=32), "gptq")
    _tokenizer().save_pretrained(out)
    loaded = load_model(ModelSpec(str(out), device="cpu"))
    assert loaded.quantization["quant_method"] == "gptq"
    assert len(quant_modules(loaded.model)) == len(qws)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        got = loaded.model.generate(ids, max_new_tokens=6, do_sample=False)
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert got.shape == want.shape
    report = dict(kernel_report(loaded.model))
    assert set(report) == set(qws) and all(any(k in d for k in ("int4pack", "vnni", "dequant")) for d in report.values())
