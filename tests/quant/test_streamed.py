"""Streaming quantization (--load stream): the same checkpoint as the whole-model path, bit for bit, on the
families whose structure quantize changes (GPT-2's Conv1D, fused MoE experts, a tied head), the shard reader
and writer, the load choice, and bad shards → one line, exit 2, nothing written."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llmopt.checkpoint.shards import INDEX_NAME, ShardReader, ShardWriter
from llmopt.cli.main import app
from llmopt.errors import LlmoptError
from tests.helpers.family_models import family_model

runner = CliRunner()
FAST = ["--samples", "8", "--seq-len", "32", "--device", "cpu", "--group-size", "32", "--no-evaluate"]


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _quantize(model_dir, out, *args):
    r = runner.invoke(app, ["quantize", str(model_dir), "--out", str(out), *FAST, *args])
    assert r.exit_code == 0, r.output
    return r


def _same_checkpoint(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    differing = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differing, differing[:5]
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.fixture(scope="module")
def family_dirs(tiny_model_dir, tmp_path_factory):
    """Random llama / gpt2 (Conv1D) / qwen2 (tied head) / mixtral (fused experts) checkpoints, sharded small so
    the streamed reads cross shard files."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    dirs = {}
    for family in ("llama", "gpt2", "qwen2", "mixtral"):
        out = tmp_path_factory.mktemp("stream") / family
        family_model(family).save_pretrained(out, safe_serialization=True, max_shard_size="200KB")
        tok.save_pretrained(out)
        dirs[family] = out
    return dirs


@pytest.mark.parametrize("family,args", [
    ("llama", ["--method", "gptq"]),
    ("llama", ["--method", "awq"]),
    ("llama", ["--method", "w8a8", "--group-size", "-1"]),
    ("gpt2", ["--method", "gptq"]),
    ("qwen2", ["--method", "gptq", "--targets", "Linear", "--targets", "lm_head"]),
    ("qwen2", ["--method", "rtn"]),
    ("mixtral", ["--method", "gptq"]),
])
def test_stream_writes_the_same_checkpoint(family_dirs, tmp_path, family, args):
    memory, stream = tmp_path / "memory", tmp_path / "stream"
    _quantize(family_dirs[family], memory, *args, "--load", "memory")
    r = _quantize(family_dirs[family], stream, *args, "--load", "stream")
    assert "streamed layer by layer" in r.output
    _same_checkpoint(memory, stream)
    meta = json.loads((stream / "llmopt.json").read_text())
    assert meta["memory"]["load"] == "stream" and meta["memory"]["peak_rss_bytes"] > 0
    assert meta["timings"]["stream_read"] >= 0 and meta["timings"]["stream_write"] >= 0


def test_streamed_checkpoint_loads_and_runs(family_dirs, tmp_path):
    """What a streamed run writes is a checkpoint the runtime loads (greedy tokens equal the memory path's)."""
    from llmopt.models import ModelSpec, load_model

    memory, stream = tmp_path / "memory", tmp_path / "stream"
    _quantize(family_dirs["llama"], memory, "--method", "gptq", "--load", "memory")
    _quantize(family_dirs["llama"], stream, "--method", "gptq", "--load", "stream")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    logits = [load_model(ModelSpec(str(p), "cpu", "float32")).model(ids).logits for p in (memory, stream)]
    assert torch.equal(logits[0], logits[1])


def test_data_free_rtn_equals_the_checked_walk(tiny_model_dir, tmp_path):
    """RTN without calibration (the default) writes the same codes as RTN with the per-layer check."""
    _quantize(tiny_model_dir, tmp_path / "free", "--method", "rtn")
    r = _quantize(tiny_model_dir, tmp_path / "checked", "--method", "rtn", "--layer-check")
    assert "per-layer relative output error" in r.output
    _same_checkpoint(tmp_path / "free", tmp_path / "checked")
    meta = json.loads((tmp_path / "free" / "llmopt.json").read_text())
    assert meta["calibration"]["samples"] == 0 and all(layer["error"] is None for layer in meta["layers"])


def test_no_layer_check_refused_for_calibrating_methods(tiny_model_dir, tmp_path):
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--method", "gptq",
                            "--no-layer-check"])
    assert r.exit_code == 2 and "calibrates on data" in r.output


def test_auto_streams_past_the_budget(tiny_model_dir, tmp_path):
    r = _quantize(tiny_model_dir, tmp_path / "q", "--method", "rtn", "--max-memory", "1MB")
    assert "streamed layer by layer" in r.output and "exceeds the 0.00 GB --max-memory 1MB" in r.output
    r = _quantize(tiny_model_dir, tmp_path / "q2", "--method", "rtn", "--max-memory", "64GB")
    assert "whole in memory" in r.output and "fits the 64.00 GB --max-memory 64GB" in r.output
    out = tmp_path / "q3"
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(out), "--max-memory", "lots"])
    assert r.exit_code == 2 and "is not a size" in r.output and not out.exists()


@pytest.mark.parametrize("family,extra", [("llama", []), ("qwen2", []), ("gpt2", []),
                                          ("qwen2", ["lm_head"])])
def test_streamed_quality_equals_the_written_checkpoints(family_dirs, tiny_model_dir, tmp_path, family, extra):
    """The quality table a streamed run measures layer by layer equals the in-memory evaluation of the same
    checkpoint through llmopt's runtime on its fp32 dequantize kernel (same weights, same windows)."""
    from llmopt.evaluate.quality import measure_quality
    from llmopt.models import ModelSpec, load_model
    from llmopt.quant.api import QuantizeArgs, load_data, quantize
    from llmopt.runtime import set_kernel

    def args(load, out):
        return QuantizeArgs(model=str(family_dirs[family]), out=out, method="gptq", group_size=32, samples=8,
                            seq_len=32, eval_samples=6, eval_seq_len=48, device="cpu", load=load,
                            targets=["Linear", *extra])

    streamed = quantize(args("stream", tmp_path / "s"))
    assert streamed.evaluated_with == "streamed" and "stream_evaluate" in streamed.timings
    quantize(args("memory", tmp_path / "m"))
    base = load_model(ModelSpec(str(family_dirs[family]), "cpu", "float32"))
    quant = load_model(ModelSpec(str(tmp_path / "m"), "cpu", "float32")).model
    set_kernel(quant, "dequant")
    _, eval_batch = load_data(args("memory", tmp_path / "x"), base.tokenizer)
    want_q = measure_quality(quant, eval_batch.input_ids, base.model)
    want_f = measure_quality(base.model, eval_batch.input_ids)
    got_q, got_f = streamed.metrics["quantized"], streamed.metrics["float"]
    assert got_f["perplexity"] == pytest.approx(want_f.perplexity, rel=1e-5)
    assert got_q["perplexity"] == pytest.approx(want_q.perplexity, rel=1e-5)
    assert got_q["kld_mean"] == pytest.approx(want_q.kld_mean, rel=1e-3) and got_q["kld_mean"] > 0
    assert got_q["top1_agreement"] == pytest.approx(want_q.top1_agreement, abs=2 / want_q.tokens)


def _bad_checkpoint(src, dst, damage):
    import shutil

    shutil.copytree(src, dst)
    damage(dst)
    return dst


@pytest.mark.parametrize("case,message", [("missing", "lacks the shard"), ("truncated", "truncated"),
                                          ("key", "no tensor")])
def test_bad_shards_one_line_exit_2_nothing_written(family_dirs, tmp_path, case, message):
    def damage(d):
        shards = sorted(d.glob("model-*.safetensors"))
        if case == "missing":
            shards[1].unlink()
        elif case == "truncated":
            data = shards[1].read_bytes()
            shards[1].write_bytes(data[: len(data) - 100])
        else:  # a tensor the model needs is absent from its shard (and from the index)
            st = load_file(str(shards[0]))
            gone = next(iter(st))
            del st[gone]
            save_file(st, str(shards[0]), metadata={"format": "pt"})
            index = json.loads((d / INDEX_NAME).read_text())
            del index["weight_map"][gone]
            (d / INDEX_NAME).write_text(json.dumps(index))

    bad = _bad_checkpoint(family_dirs["llama"], tmp_path / "bad", damage)
    out = tmp_path / "out"
    r = runner.invoke(app, ["quantize", str(bad), "--out", str(out), "--load", "stream", *FAST])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.output
    assert case == "key" or ".safetensors" in lines[0]  # names the file
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


def test_shard_writer_and_reader_round_trip(tmp_path):
    """Every dtype, shards split at the size limit, an index, and files the safetensors library reads."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}.{dt}": (torch.randn(37, 5, generator=g) * 50).to(dt)
               for i, dt in enumerate((torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int32,
                                       torch.uint8, torch.int64, torch.float8_e4m3fn))}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.empty(0, 4)
    writer = ShardWriter(tmp_path, shard_bytes=1000)
    writer.add_all(tensors)
    files = writer.close()
    assert len(files) > 2 and (tmp_path / INDEX_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shard-")]
    back = _tensors(tmp_path)  # the reference reader
    reader = ShardReader(tmp_path)
    def raw(x):
        return x.reshape(-1).view(torch.uint8)

    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(raw(back[name]), raw(t))
        got = reader.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(raw(got), raw(t))
    one = tmp_path / "one"
    one.mkdir()
    w = ShardWriter(one)
    w.add_all(tensors)
    assert [f.name for f in w.close()] == ["model.safetensors"] and not (one / INDEX_NAME).exists()
    with pytest.raises(LlmoptError, match="written twice"):
        w = ShardWriter(tmp_path / "one")
        w.add("a", torch.zeros(1))
        w.add("a", torch.zeros(1))


def test_reader_checks_headers(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(4)}, str(f))
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    f.write_bytes(raw + b"xx")
    with pytest.raises(LlmoptError, match="trailing bytes"):
        ShardReader(tmp_path)
    f.write_bytes(raw[: 8 + n])
    with pytest.raises(LlmoptError, match="truncated"):
        ShardReader(tmp_path)
