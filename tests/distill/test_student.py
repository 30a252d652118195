"""Student construction: the right teacher layers are copied, the rest of the weights too, vocab checks."""

from __future__ import annotations

import json

import pytest
import torch

from llmopt.distill import student as students
from llmopt.errors import LlmoptError


def _llama(layers: int, vocab: int = 64, hidden: int = 32, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(layers)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(("n_teacher", "n_student", "expected"), [
    (4, 2, [0, 3]), (6, 3, [0, 2, 5]), (12, 4, [0, 4, 7, 11]), (4, 1, [0]), (4, 3, [0, 2, 3]), (2, 1, [0])])
def test_layer_indices_evenly_spaced(n_teacher, n_student, expected):
    assert students.layer_indices(n_teacher, n_student) == expected


@pytest.mark.parametrize("n", [0, 4, 5])
def test_layer_indices_out_of_range(n):
    with pytest.raises(LlmoptError, match="--student-layers"):
        students.layer_indices(4, n)


@pytest.mark.parametrize("tie", [False, True])
def test_drop_layers_copies_the_kept_layers_and_everything_else(tie):
    teacher = _llama(6, tie=tie)
    st = students.drop_layers(teacher, 3)
    assert st.teacher_layers == [0, 2, 5]
    s, t = st.model, teacher
    assert s.config.num_hidden_layers == 3 and len(s.model.layers) == 3
    for j, i in enumerate(st.teacher_layers):
        for (name_s, ps), (name_t, pt) in zip(s.model.layers[j].named_parameters(),
                                             t.model.layers[i].named_parameters(), strict=True):
            assert name_s == name_t and torch.equal(ps, pt), (j, i, name_s)
        assert s.model.layers[j].self_attn.layer_idx == j  # KV cache slots follow the new numbering
    torch.testing.assert_close(s.model.embed_tokens.weight, t.model.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(s.model.norm.weight, t.model.norm.weight, rtol=0, atol=0)
    torch.testing.assert_close(s.lm_head.weight, t.lm_head.weight, rtol=0, atol=0)
    # Copies, not shared storage: training the student must leave the teacher untouched.
    with torch.no_grad():
        s.model.embed_tokens.weight.add_(1.0)
        s.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(s.model.embed_tokens.weight, t.model.embed_tokens.weight)
    assert not torch.equal(s.model.layers[0].mlp.up_proj.weight, t.model.layers[0].mlp.up_proj.weight)
    if tie:
        assert s.lm_head.weight.data_ptr() == s.model.embed_tokens.weight.data_ptr()


def test_dropped_student_computes_what_the_teacher_layers_compute():
    """Independent check: run the teacher with only the kept layers by hand and compare logits."""
    teacher = _llama(4)
    st = students.drop_layers(teacher, 2)
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        h = teacher.model.embed_tokens(x)
        pos = torch.arange(10)[None]
        emb = teacher.model.rotary_emb(h, pos)
        mask = torch.full((10, 10), float("-inf")).triu(1)[None, None]
        for i in st.teacher_layers:
            h = teacher.model.layers[i](h, attention_mask=mask, position_embeddings=emb, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        ref = teacher.lm_head(teacher.model.norm(h))
        got = st.model(input_ids=x).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_student_from_config_file_and_vocab_check(tmp_path):
    teacher = _llama(2)
    cfg = _llama(1).config.to_dict()
    (tmp_path / "ok.json").write_text(json.dumps(cfg))
    st = students.from_config_file(tmp_path / "ok.json")
    assert st.model.config.num_hidden_layers == 1
    students.check_same_vocab(teacher, None, st)
    (tmp_path / "bad.json").write_text(json.dumps({**cfg, "vocab_size": 65}))
    with pytest.raises(LlmoptError, match="vocabulary"):
        students.check_same_vocab(teacher, None, students.from_config_file(tmp_path / "bad.json"))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(LlmoptError, match="config"):
        students.from_config_file(tmp_path / "junk.json")


def test_builtin_tiny_student_recipe_builds_untrained():
    from llmopt.models.builtin import RECIPES

    st = students.from_builtin_recipe("builtin:tiny-student")
    assert st is not None and st.kind == "builtin"
    assert st.model.config.num_hidden_layers == RECIPES["tiny-student"].num_layers
    assert st.model.config.vocab_size == RECIPES["tiny"].vocab_size  # the teacher's vocabulary
    assert students.from_builtin_recipe("builtin:tiny") is None  # trainable recipes load from the cache


def test_hidden_layer_map_is_depth_proportional():
    assert students.hidden_layer_map(4, 2) == [(1, 2), (2, 4)]
    assert students.hidden_layer_map(6, 3) == [(1, 2), (2, 4), (3, 6)]
