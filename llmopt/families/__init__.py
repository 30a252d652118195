"""What llmopt knows about each decoder family, one place per concern.

- `registry.py`: per architecture — decoder layers, groups of Linears that read the same input, and the
  scale-migration mappings AWQ/SmoothQuant fold through (with what cannot be folded, and why);
  `supported_methods(config)` for the CLI and the coverage bench.
- `linear_like.py`: Linear-like modules that are not nn.Linear (transformers' Conv1D, GPT-2) as exact Linears.
- `moe.py`: mixture-of-experts blocks — finding experts (fused 3-D parameters or per-expert Linears), turning
  them into per-expert Linears for calibration and the runtime, and the hub per-expert weight names.
- `attention.py`: attention kind per layer (full, sliding window, hybrid `layer_types`, logit softcapping, MLA)
  and the KV-cache shape each layer keeps.

Nothing here imports quant/, runtime/, engine/ or cli/.
"""
