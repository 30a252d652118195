"""GPT-2's Conv1D modules: converted to exact nn.Linears for quantization; a checkpoint with float and quantized
Conv1Ds reloads through llmopt's runtime (float ones keep the hub's [in, out] layout on disk)."""

from __future__ import annotations


import torch

from tests.helpers.family_models import family_model

from llmopt.families.linear_like import Conv1DLinear, convert_conv1d  # noqa: E402


def test_convert_conv1d_is_exact_float64():
    model = family_model("gpt2", dtype=torch.float64)
    ids = torch.randint(4, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        names = convert_conv1d(model)
        out = model(ids).logits
    assert len(names) == 4 * model.config.n_layer
    assert all(isinstance(model.get_submodule(n), Conv1DLinear) for n in names)
    assert torch.equal(out, ref) or torch.allclose(out, ref, rtol=0, atol=1e-12)


def test_gpt2_with_float_conv1d_reloads(tiny_model_dir, tmp_path):
    """--ignore keeps mlp.c_proj float: written [in, out] as GPT-2 stores it, reloaded into the runtime model."""
    import json

    from safetensors import safe_open
    from transformers import AutoTokenizer

    from llmopt.quant.api import QuantizeArgs, quantize

    src = tmp_path / "gpt2"
    family_model("gpt2").save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(src)
    res = quantize(QuantizeArgs(model=str(src), out=tmp_path / "q", method="rtn", group_size=32, samples=4,
                                seq_len=32, eval_samples=2, eval_seq_len=32, device="cpu", calib_dtype="model",
                                ignore=["re:.*mlp\\.c_proj"]))
    assert res.evaluated_with == "runtime" and 0 < res.metrics["quantized"]["kld_mean"] < 1e-2
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_slice("transformer.h.0.mlp.c_proj.weight").get_shape() == [128, 64]  # Conv1D [in, out]
        assert "transformer.h.0.mlp.c_fc.weight_packed" in f.keys()
    meta = json.loads((tmp_path / "q" / "llmopt.json").read_text())
    assert "transformer.h.0.mlp.c_proj" in meta["conv1d_as_linear"]
    assert "transformer.h.0.mlp.c_proj" in meta["ignored_modules"]
