"""GGUF export: an llmopt checkpoint (quantized or float) as one file llama.cpp loads.

The `gguf` package (optional dependency, `pip install 'llmopt[gguf]'`) provides the file format only; the
mapping of llmopt's codes onto GGML blocks is here. Every GGML type used stores 32 consecutive input columns
per block with one fp16 scale (d) and, for Q4_1, one fp16 offset (m):

    Q4_0: w = (c - 8) * d, c in [0, 16)      Q4_1: w = c * d + m, c in [0, 16)      Q8_0: w = c * d, c in [-128, 128)

llmopt's codes are w = (q - zero) * scale per group (llmopt/checkpoint/types.py). When every 32-column block lies
inside one group and the codes fit the block's range, the codes carry over unchanged and only the scale is
rounded to fp16 ("exact"): symmetric 4-bit → Q4_0 (c = q - zero + 8), asymmetric 4-bit → Q4_1 (d = scale,
m = -zero * scale), 8-bit symmetric → Q8_0 (c = q - zero); any group size that is a multiple of 32 qualifies.
Otherwise (act-order g_idx, groups that are not multiples of 32, codes out of range) the block is requantized
with the checkpoint's dequantized weight as the target ("requantized", listed in the returned report).
Metadata and tensor names follow llama.cpp's convert_hf_to_gguf.py for Llama and Qwen2, including the Q/K row
permutation its Llama converter applies (llama.cpp's Llama graph uses the interleaved rope layout).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmopt.checkpoint.types import QuantizedWeight
from llmopt.errors import LlmoptError
from llmopt.progress import Counter, Progress
from llmopt.utils import atomic_write

BLOCK = 32  # input columns per block in every GGML type used here
FLOAT_TYPES = ("f16", "f32")


@dataclass(frozen=True, slots=True)
class Arch:
    """What differs between the supported architectures in the GGUF file."""

    name: str  # general.architecture
    permute_qk: bool  # llama.cpp's Llama graph expects q/k rows in the interleaved rope order


ARCHS = {"llama": Arch("llama", True), "qwen2": Arch("qwen2", False)}

_LAYER_NAMES = {  # hub suffix inside model.layers.N → GGUF suffix inside blk.N
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """One tensor written: its GGUF name, GGML type and how it got there (exact / requantized / float)."""

    name: str
    source: str
    ggml_type: str
    how: str


@dataclass(slots=True)
class GgufExport:
    path: Path
    n_bytes: int
    records: list[TensorRecord] = field(default_factory=list)

    @property
    def requantized(self) -> list[str]:
        return [r.name for r in self.records if r.how == "requantized"]

    def kinds(self) -> dict[str, int]:
        """How many tensors went each way, by "<GGML type> <exact|requantized|float>" (sorted)."""
        counts: dict[str, int] = {}
        for r in self.records:
            counts[f"{r.ggml_type} {r.how}"] = counts.get(f"{r.ggml_type} {r.how}", 0) + 1
        return dict(sorted(counts.items()))


@dataclass(slots=True)
class Blocks:
    """A weight in GGML block form. codes: [out, n_blocks, 32] int16 in the type's code range;
    d, m: [out, n_blocks] float16 (m only for Q4_1)."""

    qtype: str
    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> Blocks:
        return Blocks(self.qtype, self.codes[index], self.d[index], None if self.m is None else self.m[index])


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LlmoptError("GGUF export needs the gguf package: pip install 'llmopt[gguf]'") from None
    return gguf


def hub_to_gguf(name: str) -> str:
    """GGUF tensor name of a hub state-dict key (model.layers.3.self_attn.q_proj.weight → blk.3.attn_q.weight)."""
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    stem, _, kind = name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    raise LlmoptError(f"tensor {name!r} has no GGUF name: only Llama and Qwen2 checkpoints can be exported")


def ggml_type(bits: int, sym: bool, act_bits: int | None) -> str:
    """The GGML type a quantized Linear with these settings goes to (its data decide only exactness); W8A8
    (activation quantization) has none."""
    if act_bits is not None:
        raise LlmoptError("W8A8 checkpoints quantize activations, which GGUF files cannot express: "
                          "export an int8/gptq/awq/rtn checkpoint")
    if bits == 4:
        return "Q4_0" if sym else "Q4_1"
    if bits == 8:
        return "Q8_0"
    # 2/3-bit codes would fit Q4 blocks exactly, but the file would be as large as a 4-bit one: say so instead
    # of writing a file whose size the user did not ask for.
    raise LlmoptError(f"GGUF export stores 4- or 8-bit blocks (Q4_0/Q4_1/Q8_0); {bits}-bit codes would take "
                      f"4.5 bits a weight there: use --bits 4 or --bits 8")


def qtype_for(qw: QuantizedWeight) -> str:
    return ggml_type(qw.bits, qw.sym, qw.act_bits)


def check_in_dim(hub_name: str, n_in: int) -> None:
    if n_in % BLOCK:
        raise LlmoptError(f"{hub_name}: {n_in} input columns is not a multiple of {BLOCK}, which GGUF "
                          f"blocks need")


def check_exportable(config: dict, bits: int, sym: bool, act_bits: int | None, in_dims: dict[str, int],
                     tokenizer: dict) -> None:
    """Raise the one-line error export_gguf would raise for a checkpoint of this config (config.json as a dict)
    whose quantized Linears (hub name → input columns) use these settings, with this tokenizer.json (as a dict);
    `llmopt quantize --format gguf` calls it before it calibrates. Also fails without the gguf package."""
    _gguf()
    config = config.get("text_config", config)
    architecture(config)
    _rope_theta(config)
    ggml_type(bits, sym, act_bits)
    for hub_name, n_in in in_dims.items():
        check_in_dim(hub_name, n_in)
    check_tokenizer(tokenizer)


def exact_blocks(qw: QuantizedWeight, qtype: str) -> Blocks | None:
    """The checkpoint's own codes in block form, or None when a block spans groups or codes leave its range."""
    n_out, n_in = qw.shape
    g = qw.group_index().view(n_in // BLOCK, BLOCK)  # [n_blocks, 32]
    if not bool((g == g[:, :1]).all()):
        return None
    block_group = g[:, 0]  # [n_blocks]
    q = qw.qweight.to(torch.int16).view(n_out, -1, BLOCK)  # [out, n_blocks, 32]
    zero = qw.zeros.to(torch.int16)[:, block_group].unsqueeze(-1)  # [out, n_blocks, 1]
    scale = qw.scales.to(torch.float32)[:, block_group]  # [out, n_blocks]
    if qtype == "Q4_1":
        if int(q.min()) < 0 or int(q.max()) > 15:
            return None
        return Blocks(qtype, q, scale.half(), (-zero.squeeze(-1).float() * scale).half())
    codes = q - zero + (8 if qtype == "Q4_0" else 0)
    lo, hi = (0, 15) if qtype == "Q4_0" else (-128, 127)
    if int(codes.min()) < lo or int(codes.max()) > hi:
        return None
    return Blocks(qtype, codes, scale.half())


def requantize(w: torch.Tensor, qtype: str) -> Blocks:
    """Round-to-nearest per 32-column block of the float target w [out, in], with the fp16 scale the block
    stores. Q4_0/Q8_0 try scales that put the block's largest magnitude on the most negative code (llama.cpp's
    rule; the code range is asymmetric) or on the most positive one, each shrunk a little, and keep the lowest
    squared error per block."""
    x = w.to(torch.float32).view(w.shape[0], -1, BLOCK)  # [out, n_blocks, 32]
    if qtype == "Q4_1":
        lo, hi = x.amin(-1), x.amax(-1)  # [out, n_blocks]
        d = ((hi - lo) / 15).clamp_min(1e-12).half()
        m = lo.half()
        codes = ((x - m.float().unsqueeze(-1)) / d.float().unsqueeze(-1)).round().clamp(0, 15)
        return Blocks(qtype, codes.to(torch.int16), d, m)
    qmin, qmax, offset = (-8, 7, 8) if qtype == "Q4_0" else (-128, 127, 0)
    signed_max = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)  # [out, n_blocks]
    best_err = torch.full_like(signed_max, float("inf"))
    best_d = torch.ones_like(signed_max)
    for shrink in torch.linspace(1.0, 0.8, 9).tolist():
        for d in (signed_max * shrink / qmin, signed_max.abs() * shrink / qmax):
            d = d.half().float()
            d = torch.where(d.abs() < 6e-8, torch.full_like(d, 6e-8), d)  # an all-zero block: any scale
            c = (x / d.unsqueeze(-1)).round().clamp(qmin, qmax)
            err = ((c * d.unsqueeze(-1) - x) ** 2).sum(-1)
            better = err < best_err
            best_err, best_d = torch.where(better, err, best_err), torch.where(better, d, best_d)
    codes = (x / best_d.unsqueeze(-1)).round().clamp(qmin, qmax) + offset
    return Blocks(qtype, codes.to(torch.int16), best_d.half())


def pack(blocks: Blocks) -> np.ndarray:
    """[out, n_blocks * block_bytes] uint8 in GGML's block layout (fp16 d, [fp16 m], codes)."""
    n_out, n_blocks, _ = blocks.codes.shape
    parts = [blocks.d.numpy().astype("<f2").view(np.uint8).reshape(n_out, n_blocks, 2)]
    if blocks.m is not None:
        parts.append(blocks.m.numpy().astype("<f2").view(np.uint8).reshape(n_out, n_blocks, 2))
    codes = blocks.codes.numpy()
    if blocks.qtype == "Q8_0":
        parts.append(codes.astype(np.int8).view(np.uint8))
    else:  # byte j holds element j in its low nibble and element j + 16 in its high nibble
        nib = codes.astype(np.uint8)
        parts.append(nib[..., :16] | (nib[..., 16:] << 4))
    return np.concatenate(parts, axis=-1).reshape(n_out, -1)


def qk_row_order(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order llama.cpp's Llama converter gives q/k: per head, HF's [first half, second half] of the rotary
    dims interleaved (row i of the GGUF tensor is row order[i] of the hub tensor)."""
    head_dim = n_rows // n_heads
    return torch.arange(n_rows).view(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def architecture(config: dict) -> Arch:
    model_type = str(config.get("model_type", ""))
    if model_type not in ARCHS:
        raise LlmoptError(f"GGUF export supports Llama and Qwen2 checkpoints, not model_type {model_type!r}")
    return ARCHS[model_type]


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise LlmoptError(f"rope type {rope['rope_type']!r} is not exported to GGUF yet: only default rope")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def write_hparams(writer, config: dict, name: str) -> None:
    """The llama-family hparams convert_hf_to_gguf.py writes (context, widths, heads, rope, norm eps)."""
    n_head = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    writer.add_name(name)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if head_dim != int(config["hidden_size"]) // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))


def tokenizer_pre(tok: dict) -> str:
    """tokenizer.ggml.pre: which pre-tokenizer regex llama.cpp applies. GPT-2's is ByteLevel's built-in one;
    Llama-3 and Qwen2 split with their own regex first (they differ in digits: runs of up to 3 vs single)."""
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    patterns = [str((p.get("pattern") or {}).get("Regex", "")) for p in pre.get("pretokenizers", [])
                if p.get("type") == "Split"]
    if any(r"\p{N}{1,3}" in p for p in patterns):
        return "llama-bpe"
    if any(r"\p{N}" in p for p in patterns):
        return "qwen2"
    raise LlmoptError("the tokenizer's pre-tokenizer is not one llama.cpp is known to share (GPT-2, Llama-3, Qwen2): "
                      "cannot write tokenizer.ggml.pre")


def check_tokenizer(tok: dict) -> None:
    """Raise unless tokenizer.json (as a dict) is a byte-level BPE whose pre-tokenizer llama.cpp knows."""
    if (tok.get("model") or {}).get("type") != "BPE" or \
            (tok.get("pre_tokenizer") or {}).get("type") not in ("ByteLevel", "Sequence"):
        raise LlmoptError("only byte-level BPE tokenizers (tokenizer.json model BPE) are exported to GGUF")
    tokenizer_pre(tok)


def write_tokenizer(writer, ckpt: Path, config: dict) -> None:
    """tokenizer.ggml.* for a byte-level BPE tokenizer.json (what the built-in model and Llama-3/Qwen2 use):
    model gpt2, tokens by id, types (CONTROL for special added tokens), merges, special ids, add_bos."""
    gguf = _gguf()
    path = ckpt / "tokenizer.json"
    if not path.is_file():
        raise LlmoptError(f"{ckpt} has no tokenizer.json: GGUF files carry the tokenizer")
    tok = json.loads(path.read_text())
    check_tokenizer(tok)
    model = tok["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    n_vocab = int(config["vocab_size"])
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [gguf.TokenType.CONTROL if tokens[i] in special else
             gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _special_ids(writer, ckpt, config, vocab, tok)


def _special_ids(writer, ckpt: Path, config: dict, vocab: dict[str, int], tok: dict) -> None:
    tcfg_path = ckpt / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for kind, setter in setters.items():
        name = tcfg.get(f"{kind}_token")
        name = name.get("content") if isinstance(name, dict) else name
        token_id = vocab.get(name) if name is not None else config.get(f"{kind}_token_id")
        if isinstance(token_id, int):
            setter(token_id)
    # the post-processor template (or tokenizer_config) says whether encoding prepends BOS
    single = json.dumps((tok.get("post_processor") or {}).get("single", []))
    bos = tcfg.get("bos_token")
    add_bos = tcfg.get("add_bos_token", bos is not None and f'"{bos}"' in single)
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_eos_token(bool(tcfg.get("add_eos_token", False)))


@dataclass(frozen=True, slots=True)
class Converted:
    """One tensor ready for the writer: data in GGUF's layout, the GGML type (None: numpy's), its record."""

    data: np.ndarray
    raw_dtype: object | None
    record: TensorRecord


def _row_order(hub_name: str, config: dict, arch: Arch) -> torch.Tensor | None:
    if not arch.permute_qk:
        return None
    n_head = int(config["num_attention_heads"])
    heads = {"q_proj": n_head, "k_proj": int(config.get("num_key_value_heads") or n_head)}
    proj = hub_name.rsplit(".", 2)[-2] if hub_name.count(".") >= 2 else ""
    if proj not in heads:
        return None
    n_rows = int(config.get("head_dim") or int(config["hidden_size"]) // n_head) * heads[proj]
    return qk_row_order(n_rows, heads[proj])


def convert_quantized(hub_name: str, qw: QuantizedWeight, order: torch.Tensor | None) -> Converted:
    """A quantized Linear's weight as GGML blocks: its own codes where exact, requantized where not."""
    gguf = _gguf()
    qtype = qtype_for(qw)
    blocks = exact_blocks(qw, qtype)
    how = "exact"
    if blocks is None:
        blocks, how = requantize(qw.dequantize(torch.float32), qtype), "requantized"
    if order is not None:
        blocks = blocks.rows(order)
    name = hub_to_gguf(f"{hub_name}.weight")
    return Converted(pack(blocks), getattr(gguf.GGMLQuantizationType, qtype), TensorRecord(name, hub_name, qtype, how))


def convert_float(key: str, t: torch.Tensor, order: torch.Tensor | None, float_type: str) -> Converted:
    """A float tensor: 1-D ones (norms, biases) in F32 as convert_hf_to_gguf.py writes them, the rest in
    float_type."""
    if order is not None:
        t = t[order]
    kind = "f32" if t.dim() == 1 else float_type
    data = t.detach().to(torch.float32 if kind == "f32" else torch.float16).contiguous().numpy()
    name = hub_to_gguf(key)
    return Converted(data, None, TensorRecord(name, key, kind.upper(), "float"))


@dataclass(slots=True)
class Checkpoint:
    config: dict
    qweights: dict[str, QuantizedWeight]
    tensors: dict[str, torch.Tensor]


def read_any(path: Path) -> Checkpoint:
    """A quantized checkpoint through read_checkpoint, or a float one (no quantization_config) as tensors."""
    from llmopt.checkpoint.formats import _io, read_checkpoint, read_config

    if not path.is_dir():
        raise LlmoptError(f"checkpoint directory {path} does not exist")
    config = read_config(path)
    if "quantization_config" not in config:
        return Checkpoint(config, {}, _io.load_tensors(path))
    config, qweights, tensors = read_checkpoint(path)
    return Checkpoint(config, qweights, tensors)


def convert_all(ckpt: Checkpoint, arch: Arch, float_type: str, progress: Progress | None) -> list[Converted]:
    """Every tensor of the checkpoint in GGUF form, in the hub's layer order."""
    for hub_name, qw in ckpt.qweights.items():  # refuse before any work is reported
        qtype_for(qw)
        check_in_dim(hub_name, qw.shape[1])
    counter = Counter(progress, "gguf tensor", len(ckpt.qweights) + len(ckpt.tensors))
    out: list[Converted] = []
    for hub_name, qw in ckpt.qweights.items():
        out.append(convert_quantized(hub_name, qw, _row_order(f"{hub_name}.weight", ckpt.config, arch)))
        if qw.bias is not None:
            bias_order = _row_order(f"{hub_name}.bias", ckpt.config, arch)
            out.append(convert_float(f"{hub_name}.bias", qw.bias, bias_order, float_type))
        counter.advance()
    for key, t in ckpt.tensors.items():
        if key.endswith("rotary_emb.inv_freq"):  # recomputed from rope_freq_base
            continue
        out.append(convert_float(key, t, _row_order(key, ckpt.config, arch), float_type))
        counter.advance()
    return out


def _file_type(converted: list[Converted], float_type: str) -> int:
    gguf = _gguf()
    quantized = [c.record.ggml_type for c in converted if c.raw_dtype is not None]
    if not quantized:
        return gguf.LlamaFileType.MOSTLY_F16 if float_type == "f16" else gguf.LlamaFileType.ALL_F32
    most = max(set(quantized), key=quantized.count)
    return getattr(gguf.LlamaFileType, f"MOSTLY_{most}")


def export_gguf(checkpoint: Path, out: Path, float_type: str = "f16", progress: Progress | None = None,
                name: str | None = None) -> GgufExport:
    """Write `checkpoint` (an llmopt/HF checkpoint directory, quantized or float) to the GGUF file `out`
    atomically; returns what each tensor became. float_type: f16 or f32 for the float 2-D tensors; name:
    general.name (default: the checkpoint directory's name)."""
    gguf = _gguf()
    checkpoint, out = Path(checkpoint), Path(out)
    if float_type not in FLOAT_TYPES:
        raise LlmoptError(f"float type {float_type!r}: use one of {', '.join(FLOAT_TYPES)}")
    if out.is_dir() or not out.parent.is_dir():
        raise LlmoptError(f"--out {out} must be a file path in an existing directory")
    ckpt = read_any(checkpoint)
    config = ckpt.config.get("text_config", ckpt.config)
    arch = architecture(config)
    converted = convert_all(ckpt, arch, float_type, progress)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch.name)
        write_hparams(writer, config, name or checkpoint.name)
        writer.add_file_type(_file_type(converted, float_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, checkpoint, config)
        for c in converted:
            writer.add_tensor(c.record.name, c.data, raw_dtype=c.raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(out, write)
    return GgufExport(out, out.stat().st_size, [c.record for c in converted])


__all__ = ["ARCHS", "FLOAT_TYPES", "Blocks", "GgufExport", "TensorRecord", "check_exportable", "check_tokenizer",
           "exact_blocks", "export_gguf", "ggml_type", "hub_to_gguf", "pack", "qk_row_order", "qtype_for",
           "requantize"]
