"""Random tiny decoders of every family llmopt claims (hidden 64, 2-4 layers), built in the test in seconds.

`FAMILIES` is the coverage list the tests and bench/family_coverage.py walk. Each config is the family's own
transformers config with only the sizes changed, plus what makes the family's special path run at a tiny size:
a sliding window shorter than the prompts (mistral, gemma2/3, exaone4, starcoder2), hybrid `layer_types`,
attention/final logit softcapping (gemma2), MLA (deepseek_v3), parallel blocks (phi, gpt_neox, falcon, cohere).
"""

from __future__ import annotations

import torch

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=3)
_DROP = object()  # a common size the family's config does not take (GPT-2 names its own)
_FAMILY: dict[str, dict] = {
    "llama": dict(head_dim=16),
    "mistral": dict(head_dim=16, sliding_window=8),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128),
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=8, num_hidden_layers=4, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, query_pre_attn_scalar=16),
    "gemma3_text": dict(head_dim=16, sliding_window=8, num_hidden_layers=4, sliding_window_pattern=2,
                        query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"] * 2),
    "phi": dict(partial_rotary_factor=0.5, num_key_value_heads=4),
    "phi3": dict(),
    "gpt_neox": dict(rotary_pct=0.5, num_key_value_heads=_DROP),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, num_key_value_heads=_DROP),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, num_key_value_heads=_DROP, parallel_attn=True,
                   bias=False),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=128, num_key_value_heads=_DROP,
                 hidden_size=_DROP, num_hidden_layers=_DROP, num_attention_heads=_DROP, intermediate_size=_DROP,
                 max_position_embeddings=_DROP),
    "stablelm": dict(partial_rotary_factor=0.5),
    "olmo2": dict(),
    "granite": dict(),
    "cohere": dict(),
    "starcoder2": dict(sliding_window=8),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=None,
                        num_key_value_heads=4, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16),
    "exaone4": dict(head_dim=16, sliding_window=8, num_hidden_layers=4,
                    layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]),
}
FAMILIES = tuple(_FAMILY)


def family_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kw = {k: v for k, v in {**_COMMON, **_FAMILY[model_type], **overrides}.items() if v is not _DROP}
    return AutoConfig.for_model(model_type, **kw)


def family_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, attention_gain: float = 1.0,
                 **overrides):
    """A random model whose every weight matters: zero-initialised routers and biases get random values.

    attention_gain multiplies the weights of every Linear inside the attention modules: at the usual init std of
    0.02 the q·k logits of a tiny model are ~0.1 and attention is near uniform, so a wrong scale, mask or
    query→kv head mapping would leave greedy tokens unchanged; a gain of ~5 makes the logits O(1)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(model_type, **overrides), dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().max() == 0 and (p.dim() >= 2 or name.endswith("bias")):
                p.normal_(0, 0.1)
        if attention_gain != 1.0:
            for mod in model.modules():
                if type(mod).__name__.endswith("Attention"):
                    for lin in mod.modules():
                        if isinstance(lin, torch.nn.Linear) or type(lin).__name__ == "Conv1D":
                            lin.weight.mul_(attention_gain)
    return model
