"""Low-bit GEMM for x86 CPUs with AVX512-VNNI, compiled at load time by LLVM (llvmlite) — no C compiler.

torch's CPU low-bit kernels (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm, _int_mm) reach 15-30 G
weights/s at batch-1 decode on a 2-core AVX-512 machine; llama.cpp's Q4_0 and Q8_0 dot products reach more
because they quantize the activations to int8 in blocks of 32 and multiply u8·s8 with VPDPBUSD (64
multiply-adds an instruction). This module does the same arithmetic:

    y[m, n] = Σ_g s[n, g] · Σ_{b ∈ g} d[m, b] · (Σ_{k ∈ b} q[n, k] · xq[m, k] − z[n, g] · Σ_{k ∈ b} xq[m, k])

with weight codes q (u8: 0..15 for int4, 0..255 for int8), zero z, scale s; activation codes xq (s8) and
scales d per block of 32 (or, for W8A8 checkpoints, one scale per token: the checkpoint's own activation
quantization, so the integer products are exactly those of torch._int_mm). The integer dot of one block is
exact; blocks and groups are summed in float32.

Layout ("tile16"): rows in tiles of 16, one 32-bit lane per row, so the 16 rows of a tile fill one 512-bit
register and need no horizontal sums. Per tile, per block of 32 columns: int4 stores 4 vectors of 64 bytes
(lane r of vector c holds row r's packed bytes 4c..4c+3 of the block, byte i = code i | code i+16 << 4, Q4_0's
order); int8 stores 8 vectors (lane r of vector c holds row r's codes 4c..4c+3). Scales and zeros are
[N/16, G, 16], read in the same order as the weights.

The hot loop is LLVM IR built here with llvmlite's builder and JIT-compiled for the host CPU; numba supplies
the activation quantization and the threads (a prange over row ranges calling the compiled function). Both
are wheels, so nothing is compiled by the user's toolchain. Where either is missing, or the CPU lacks
AVX512-VNNI/BW, `unavailable()` says why and the runtime keeps torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np
import torch

TILE = 16  # rows per tile: one int32 lane each in a 512-bit register
BLOCK = 32  # columns per activation block (llama.cpp's Q8_0 block)
_N_ARGS = 13  # t0, t1, M, NT, G, bpg, w, xq, xd, xs, s, z, out — see _build_ir (pointers passed as i64)


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: weight bits, per-group zeros (asym) or one constant zero, scale storage dtype."""

    bits: int  # 4 or 8
    asym: bool
    half_scales: bool  # scales stored as float16 (exact for them) instead of float32

    @property
    def name(self) -> str:
        return f"q{self.bits}{'a' if self.asym else 's'}{'h' if self.half_scales else 'f'}"


@functools.cache
def unavailable() -> str | None:
    """Why this module cannot run here (None when it can)."""
    try:
        import llvmlite.binding as llb
        import numba  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install numba)"
    feats = llb.get_host_cpu_features()
    missing = [f for f in ("avx512f", "avx512bw", "avx512vnni") if not feats.get(f, False)]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    return None


@functools.cache
def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles (Linux's flags; elsewhere assumed not)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


# ---- the kernel, as LLVM IR -------------------------------------------------------------------------

class _IR:
    """Builder helpers for the kernel's loops and vectors."""

    def __init__(self, ir, builder):
        self.ir, self.b = ir, builder
        self.i32, self.i64, self.f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
        self.vi = ir.VectorType(self.i32, TILE)
        self.vf = ir.VectorType(self.f32, TILE)

    def c64(self, v: int):
        return self.ir.Constant(self.i64, v)

    def splat(self, scalar, vty):
        ir, b = self.ir, self.b
        one = b.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(self.i32, 0))
        return b.shuffle_vector(one, ir.Constant(vty, ir.Undefined), ir.Constant(self.vi, [0] * TILE))

    def loop(self, lo, hi, body) -> None:
        """for iv in [lo, hi): body(iv), as a counted loop with a phi."""
        b = self.b
        pre, head, main, done = b.block, b.append_basic_block(), b.append_basic_block(), b.append_basic_block()
        b.branch(head)
        b.position_at_end(head)
        iv = b.phi(self.i64)
        iv.add_incoming(lo, pre)
        b.cbranch(b.icmp_signed("<", iv, hi), main, done)
        b.position_at_end(main)
        body(iv)
        iv.add_incoming(b.add(iv, self.c64(1)), b.block)
        b.branch(head)
        b.position_at_end(done)

    def idx(self, *terms):
        """Σ products of i64 terms: idx((a, b), c) = a·b + c."""
        b, total = self.b, None
        for t in terms:
            v = t
            if isinstance(t, tuple):
                v = t[0]
                for f in t[1:]:
                    v = b.mul(v, f)
            total = v if total is None else b.add(total, v)
        return total


def _block_dot(h: _IR, dpbusd, v: Variant, wv, xq, wbase, xbase):
    """Σ q·xq over one 32-column block of one tile → <16 x i32> (two accumulators halve the dependency chain)."""
    ir, b = h.ir, h.b
    acc = [ir.Constant(h.vi, [0] * TILE)] * 2
    for c in range(32 // (4 * (8 // v.bits))):  # 4 vectors for int4, 8 for int8
        w = b.load(b.gep(wv, [b.add(wbase, h.c64(c))]), align=4)  # 16 lanes × 4 bytes
        x_at = lambda j: h.splat(b.load(b.gep(xq, [b.add(xbase, h.c64(j))]), align=1), h.vi)
        if v.bits == 8:
            acc[c % 2] = b.call(dpbusd, [acc[c % 2], w, x_at(c)])
            continue
        mask = ir.Constant(h.vi, [0x0F0F0F0F] * TILE)
        lo, hi = b.and_(w, mask), b.and_(b.lshr(w, ir.Constant(h.vi, [4] * TILE)), mask)
        acc[0] = b.call(dpbusd, [acc[0], lo, x_at(c)])  # codes 4c..4c+3 of the block
        acc[1] = b.call(dpbusd, [acc[1], hi, x_at(4 + c)])  # codes 16+4c..16+4c+3
    return b.add(acc[0], acc[1])


def _build_ir(v: Variant) -> str:
    """The kernel `tiles(t0, t1, M, NT, G, bpg, w, xq, xd, xs, s, z, out)` for row tiles [t0, t1) of NT.

    xq: [M, nb·32] int8 (read as i32 quads); xd, xs: [M, nb] float32 block scales and block sums (sym: already
    × the constant zero); s, z: [NT, G, 16]; out: [M, NT·16] float32. bpg = blocks per group, nb = G·bpg.
    """
    import llvmlite.binding as llb
    from llvmlite import ir

    mod = ir.Module(name=f"llmopt_vnni_{v.name}")
    mod.triple = llb.get_process_triple()
    h = _IR(ir, None)
    dpbusd = ir.Function(mod, ir.FunctionType(h.vi, [h.vi] * 3), "llvm.x86.avx512.vpdpbusd.512")
    fma = ir.Function(mod, ir.FunctionType(h.vf, [h.vf] * 3), "llvm.fma.v16f32")
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [h.i64] * _N_ARGS), "tiles")
    t0, t1, m_rows, n_tiles, n_groups, bpg, *ptrs = fn.args
    h.b = b = ir.IRBuilder(fn.append_basic_block("entry"))
    half = ir.VectorType(ir.HalfType(), TILE)
    types = (h.vi, h.i32, h.f32, h.f32, half if v.half_scales else h.vf, half, h.vf)
    wv, xq, xd, xs, sp, zp, outp = (b.inttoptr(p, t.as_pointer()) for p, t in zip(ptrs, types))
    nb = b.mul(n_groups, bpg)
    vecs = h.c64(32 // (4 * (8 // v.bits)))  # vectors per block: 4 for int4, 8 for int8
    acc_slot = b.alloca(h.vf)  # promoted to a register by mem2reg

    def block(t, m, kb):
        gi = h.idx((t, n_groups), b.udiv(kb, bpg))
        dot = _block_dot(h, dpbusd, v, wv, xq, h.idx((t, nb, vecs), (kb, vecs)), h.idx((m, nb, h.c64(8)), (kb, h.c64(8))))
        mb = h.idx((m, nb), kb)
        d, sx = (h.splat(b.load(b.gep(p, [mb])), h.vf) for p in (xd, xs))
        scale = b.load(b.gep(sp, [gi]), align=2)
        scale = b.fpext(scale, h.vf) if v.half_scales else scale
        zero_term = b.fmul(b.fpext(b.load(b.gep(zp, [gi]), align=2), h.vf), sx) if v.asym else sx
        f = b.fsub(b.sitofp(dot, h.vf), zero_term)
        b.store(b.call(fma, [f, b.fmul(scale, d), b.load(acc_slot)]), acc_slot)

    def row(t, m):
        b.store(ir.Constant(h.vf, [0.0] * TILE), acc_slot)
        h.loop(h.c64(0), nb, lambda kb: block(t, m, kb))
        b.store(b.load(acc_slot), b.gep(outp, [h.idx((m, n_tiles), t)]), align=4)

    h.loop(t0, t1, lambda t: h.loop(h.c64(0), m_rows, lambda m: row(t, m)))
    b.ret_void()
    return str(mod)


# ---- compile once per process and variant ------------------------------------------------------------

_ENGINES: list = []  # the JIT engines own the machine code: keep them alive for the process


@functools.cache
def _address(v: Variant) -> int:
    """JIT-compile the variant's IR for this CPU; the entry point's address."""
    import llvmlite.binding as llb

    llb.initialize_native_target()
    llb.initialize_native_asmprinter()
    tm = llb.Target.from_default_triple().create_target_machine(
        cpu=llb.get_host_cpu_name(), features=llb.get_host_cpu_features().flatten(), opt=3, jit=True)
    mod = llb.parse_assembly(_build_ir(v))
    mod.verify()
    passes = llb.create_pass_builder(tm, llb.create_pipeline_tuning_options(speed_level=3))
    passes.getModulePassManager().run(mod, passes)
    engine = llb.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    _ENGINES.append(engine)
    return engine.get_function_address("tiles")


@functools.cache
def _quantizer():
    """numba-compiled activation quantizer → (xq [M, K] int8, xd [M, K/32], xs [M, K/32] float32).

    Per block of 32: absmax/127, round half to even. Per token (W8A8, kernels.quantize_per_token's arithmetic):
    absmax/127.5 over the row, clamp to [-128, 127], round half to even, the row's scale in every block.
    xs = Σ codes of the block · zero (sym layers fold their constant zero in here).
    """
    import numba

    @numba.njit(nogil=True, cache=True)
    def quantize(x, zero, per_token):
        m, k = x.shape
        xq, xd, xs = np.empty((m, k), np.int8), np.empty((m, k // 32), np.float32), np.empty((m, k // 32), np.float32)
        for i in range(m):
            row_scale = np.float32(0.0)
            if per_token:
                for j in range(k):
                    row_scale = max(row_scale, abs(x[i, j]))
                row_scale = row_scale / np.float32(127.5)
                if row_scale == 0:
                    row_scale = np.finfo(np.float32).eps
            for blk in range(k // 32):
                d = row_scale
                if not per_token:
                    for j in range(blk * 32, blk * 32 + 32):
                        d = max(d, abs(x[i, j]))
                    d = d / np.float32(127.0)
                total = 0
                for j in range(blk * 32, blk * 32 + 32):
                    q = int(np.rint(min(max(x[i, j] / d, np.float32(-128.0)), np.float32(127.0)))) if d > 0 else 0
                    xq[i, j] = q
                    total += q
                xd[i, blk] = d
                xs[i, blk] = np.float32(total) * zero
        return xq, xd, xs

    return quantize


@functools.cache
def _runner(v: Variant, per_token: bool):
    """numba functions (serial, parallel): quantize the activations, then run the compiled tiles — in one call,
    or over `threads` row ranges. The serial one has no parallel region, so one thread starts no pool."""
    import numba

    tiles = ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * _N_ARGS)(_address(v))
    quant = _quantizer()
    zero = np.float32(1.0 if v.asym else (8.0 if v.bits == 4 else 128.0))  # sym: fold the zero into xs

    @numba.njit(parallel=True, nogil=True)
    def parallel(x, w, s, z, out, n_tiles, n_groups, bpg, threads):
        xq, xd, xs = quant(x, zero, per_token)
        for i in numba.prange(threads):
            tiles(n_tiles * i // threads, n_tiles * (i + 1) // threads, x.shape[0], n_tiles, n_groups, bpg,
                  w, xq.ctypes.data, xd.ctypes.data, xs.ctypes.data, s, z, out)

    @numba.njit(nogil=True)
    def serial(x, w, s, z, out, n_tiles, n_groups, bpg):
        xq, xd, xs = quant(x, zero, per_token)
        tiles(0, n_tiles, x.shape[0], n_tiles, n_groups, bpg, w, xq.ctypes.data, xd.ctypes.data, xs.ctypes.data,
              s, z, out)

    return serial, parallel


def quantize_activations(x: torch.Tensor, per_token: bool = False) -> tuple[torch.Tensor, ...]:
    """[M, K] float → (xq int8 [M, K], xd [M, K/32], raw block sums [M, K/32]) as the kernel makes them."""
    xq, xd, xs = _quantizer()(x.detach().float().contiguous().numpy(), np.float32(1.0), per_token)
    return torch.from_numpy(xq), torch.from_numpy(xd), torch.from_numpy(xs)


# ---- weights in the tile16 layout ---------------------------------------------------------------------

@dataclass
class Packed:
    """One Linear's weights for the kernel (tensors owned by the module as buffers)."""

    variant: Variant
    n_out: int
    n_in: int
    group_size: int
    per_token: bool  # W8A8: one activation scale per token (the checkpoint's), else per block of 32

    def __post_init__(self):
        gs = self.n_in if self.group_size == -1 else self.group_size
        self.n_tiles, self.n_groups, self.blocks_per_group = self.n_out // TILE, self.n_in // gs, gs // BLOCK


def supported(n_out: int, n_in: int, group_size: int) -> bool:
    """Shapes the kernel runs: whole tiles of rows, whole blocks of columns, groups of whole blocks."""
    gs = n_in if group_size == -1 else group_size
    return n_out % TILE == 0 and n_in % BLOCK == 0 and gs % BLOCK == 0 and n_in % gs == 0


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] codes (0..2**bits-1) → tile16 uint8 [N/16, K/32, vectors, 16, 4] (see the module docstring)."""
    n, k = q.shape
    q = q.to(torch.uint8).reshape(n // TILE, TILE, k // BLOCK, BLOCK)  # [T, lane, block, col]
    if bits == 4:
        q = q[..., :16] | (q[..., 16:] << 4)  # byte i = code i | code i+16 << 4
    return q.reshape(n // TILE, TILE, k // BLOCK, -1, 4).permute(0, 2, 3, 1, 4).contiguous()


def unpack_codes(tiles: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes → [N, K] uint8 codes."""
    t, nb, vecs, lanes, _ = tiles.shape
    q = tiles.permute(0, 3, 1, 2, 4).reshape(t * lanes, nb, vecs * 4)  # [N, block, bytes]
    if bits == 4:
        q = torch.cat((q & 0xF, q >> 4), dim=-1)
    return q.reshape(t * lanes, nb * BLOCK)


def pack_groups(t: torch.Tensor, half: bool) -> torch.Tensor:
    """[N, G] per-group values → [N/16, G, 16] float16 or float32."""
    n, g = t.shape
    return t.reshape(n // TILE, TILE, g).transpose(1, 2).contiguous().to(torch.float16 if half else torch.float32)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """float16/float32 → the same bytes as int16/int32 (the kernel reads pointers, not dtypes)."""
    return t.view(torch.int16 if t.dtype == torch.float16 else torch.int32)


def exact_in_half(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.float().half().float(), t.float()))


def gemm(x: torch.Tensor, p: Packed, tiles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """[M, K] activations × packed weights → [M, N] float32 (CPU tensors)."""
    return Kernel(p, tiles, scales, zeros)(x)


class Kernel:
    """One packed weight bound to its compiled runner, pointers resolved once (decode calls it per token)."""

    def __init__(self, p: Packed, tiles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None):
        self.p, self.tensors = p, (tiles, scales, zeros)  # the tensors stay referenced: the pointers stay valid
        self.serial, self.parallel = _runner(p.variant, p.per_token)
        self.args = (tiles.data_ptr(), scales.data_ptr(), 0 if zeros is None else zeros.data_ptr())
        self.shape = (p.n_tiles, p.n_groups, p.blocks_per_group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], self.p.n_out, dtype=torch.float32)
        if x.dtype != torch.float32 or x.requires_grad or not x.is_contiguous():
            x = x.detach().float().contiguous()
        w, s, z = self.args
        n_tiles, n_groups, bpg = self.shape
        threads = _threads()
        if threads > 1:
            self.parallel(x.numpy(), w, s, z, out.data_ptr(), n_tiles, n_groups, bpg, threads)
        else:
            self.serial(x.numpy(), w, s, z, out.data_ptr(), n_tiles, n_groups, bpg)
        return out


def concat(packs: list[tuple[Packed, torch.Tensor, torch.Tensor, torch.Tensor | None]]):
    """Layers of one input (q/k/v, gate/up) as one kernel: tiles, scales and zeros joined along the rows.

    Returns the joint (Packed, tiles, scales, zeros) and each layer's views into the joint tensors, so the
    layers keep their own (now shared) storage and nothing is held twice.
    """
    first = packs[0][0]
    joint_p = Packed(first.variant, sum(p.n_out for p, *_ in packs), first.n_in, first.group_size, first.per_token)
    joined = [torch.cat([pk[i] for pk in packs]) if packs[0][i] is not None else None for i in (1, 2, 3)]
    views, start = [], 0
    for p, *_ in packs:
        t = slice(start, start + p.n_tiles)
        views.append(tuple(None if j is None else j[t] for j in joined))
        start += p.n_tiles
    return (joint_p, *joined), views


_THREADS = [0, 0]  # torch's thread count last seen, and what numba's pool was set to for it


def _threads() -> int:
    """torch's intra-op thread count, mirrored into numba's pool when it changes (one thread runs serial, so
    numba's pool is never started for it)."""
    n = torch.get_num_threads()
    if n == 1:
        return 1
    if n != _THREADS[0]:
        import numba

        _THREADS[:] = [n, min(n, numba.config.NUMBA_NUM_THREADS)]
        numba.set_num_threads(_THREADS[1])
    return _THREADS[1]
