"""Text sources → token windows: splits, shapes, determinism, local files, clear errors."""

import json

import pytest
import torch

from llmopt.calibration import DataSpec, load_texts, load_token_batch, pack, token_stream
from llmopt.calibration.corpus import SPLITS, all_documents, split_documents
from llmopt.errors import LlmoptError
from llmopt.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_builtin_splits_disjoint_and_complete():
    texts = {s: {d.text for d in split_documents(s)} for s in SPLITS}
    assert texts["calib"].isdisjoint(texts["test"])
    assert texts["train"].isdisjoint(texts["test"]) and texts["train"].isdisjoint(texts["calib"])
    assert sum(len(t) for t in texts.values()) == len(all_documents())
    assert all(len(t) > 100 for t in texts.values())


def test_builtin_split_is_deterministic():
    assert [d.doc_id for d in split_documents("test")][:50] == [d.doc_id for d in split_documents("test")][:50]


def test_batch_shape_and_determinism(tok):
    a = load_token_batch(DataSpec("builtin"), tok, samples=8, seq_len=64, seed=1)
    b = load_token_batch(DataSpec("builtin"), tok, samples=8, seq_len=64, seed=1)
    c = load_token_batch(DataSpec("builtin"), tok, samples=8, seq_len=64, seed=2)
    assert a.input_ids.shape == (8, 64) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256
    assert not torch.equal(a.input_ids, c.input_ids)
    assert a.split == "calib"


def test_calib_and_test_windows_do_not_overlap(tok):
    calib = load_token_batch(DataSpec("builtin"), tok, 32, 32, purpose="calib").input_ids
    test = load_token_batch(DataSpec("builtin"), tok, 32, 32, purpose="test").input_ids
    calib_rows = {tuple(r.tolist()) for r in calib}
    assert not any(tuple(r.tolist()) in calib_rows for r in test)


def test_pack_packs_short_texts():
    stream = torch.arange(100)
    out = pack(stream, samples=3, seq_len=30, seed=0)
    assert out.shape == (3, 30)
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 30)) for row in out)  # contiguous windows


def test_too_few_tokens(tok):
    with pytest.raises(LlmoptError, match="fewer than"):
        load_token_batch(DataSpec("builtin"), tok, samples=100_000, seq_len=512)


def test_local_txt_jsonl_csv(tmp_path, tok):
    (tmp_path / "a.txt").write_text("hello world " * 200)
    assert load_texts(DataSpec(str(tmp_path / "a.txt")))[0].startswith("hello")
    rows = [{"content": f"row {i} " * 20} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    texts = load_texts(DataSpec(str(tmp_path / "d.jsonl"), text_field="content"))
    assert len(texts) == 30
    (tmp_path / "d.csv").write_text("content\n" + "\n".join(r["content"] for r in rows))
    assert len(load_texts(DataSpec(str(tmp_path / "d.csv"), text_field="content"))) == 30
    batch = load_token_batch(DataSpec(str(tmp_path / "d.jsonl"), text_field="content"), tok, 4, 16)
    assert batch.input_ids.shape == (4, 16)


def test_missing_text_field(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x" * 50}))
    with pytest.raises(LlmoptError, match="no text field 'text'"):
        load_texts(DataSpec(str(tmp_path / "d.jsonl")))


def test_empty_data(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(LlmoptError, match="no non-empty text"):
        load_texts(DataSpec(str(tmp_path / "empty.txt")))
    with pytest.raises(LlmoptError):
        DataSpec("")


def test_missing_file_and_unreachable_hub():
    with pytest.raises(LlmoptError, match="does not exist"):
        load_texts(DataSpec("./nope.jsonl"))
    with pytest.raises(LlmoptError, match="cannot load dataset"):
        load_texts(DataSpec("nobody-here/no-such-dataset-xyz"))


def test_token_stream_separates_with_eos(tok):
    s = token_stream(["a b", "c d"], tok)
    assert (s == tok.eos_token_id).sum() == 2 and s[-1] == tok.eos_token_id
