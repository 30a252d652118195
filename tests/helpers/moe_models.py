"""Random tiny MoE models of every family llmopt splits into per-expert Linears (hidden 64, 4 experts, top-2)."""

from __future__ import annotations

import torch

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=3)
_FAMILY = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
    # layer 0 dense (first_k_dense_replace), layer 1 MoE with a shared expert; MLA attention
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=None,
                        num_key_value_heads=4,
                        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=None,
                        num_key_value_heads=4,
                        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16),
}


def moe_config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**_COMMON, **_FAMILY[model_type], **overrides})


def moe_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, experts: str | None = None,
              **overrides):
    """A random model whose weights all have a usable scale (transformers inits routers of some families to 0).
    experts: transformers' experts implementation (None: its default, grouped_mm; "eager" runs in float64)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = {} if experts is None else {"experts_implementation": experts}
    model = AutoModelForCausalLM.from_config(moe_config(model_type, **overrides), dtype=dtype, **kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p.abs().max() == 0:  # zero-initialised routers: random, else routing is a tie
                p.normal_(0, 0.1)
    return model
