"""What a checkpoint is, apart from who writes or reads it.

types.py     QuantArgs and QuantizedWeight: the unpacked codes every method produces and every format packs
formats/     compressed-tensors, GPTQ and AWQ writers/readers (config.json quantization_config + tensors)
kv_scales.py static K/V scales (compressed-tensors kv_cache_scheme, k_scale/v_scale tensors)
manifest.py  llmopt.json, the record llmopt writes beside every checkpoint

quant/, runtime/, models/, evaluate/ and backends/ depend on this package; it depends only on families/ (which
module names an architecture uses), errors and utils.
"""
