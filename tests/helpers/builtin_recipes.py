"""The test-sized builtin recipe: builds in seconds, still learns."""

from __future__ import annotations

from dataclasses import replace

from llmopt.models.builtin import TinyRecipe


def small_recipe(**overrides: object) -> TinyRecipe:
    """A tiny-tiny variant of builtin:tiny (2 layers, hidden 128, 4 heads over 2 kv heads, vocab 512)."""
    base = TinyRecipe(name="test-tiny", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                      num_heads=4, num_kv_heads=2, seq_len=64, batch_size=16, steps=100, lr=1e-2, warmup=5)
    return replace(base, **overrides)
