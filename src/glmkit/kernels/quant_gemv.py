"""Single-row (batch-1 decode) weight-only products on CUDA, the kernels QuantMatmul sends one row to, and the
PTX helpers they share with its tiled kernel (kernels/quant_matmul.py holds the layouts and the dispatch).

* _int8_gemv_kernel: bytes to fp32 without a conversion instruction (_int8_to_f32), fp32 products.
* _int4_gemv_kernel: packed bf16x2/f16x2 products (_asm_dot4), tensors laid out [K tiles, rows, words] so that
  nothing crosses threads inside the loop.

Without a GPU (Triton's interpreter, which cannot run inline PTX) the same sums run in plain fp32 operations.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gemv import _weight_tile
from .pdl import gdc_launch_dependents, gdc_wait

# Nibble magic: (magic | u) is the float magic + u exactly for u < 16, and fma(., 1, -(magic + 8)) gives u - 8.
_MAGIC = {  # magic | magic, 1.0 | 1.0, -(magic + 8) | -(magic + 8), packed fma type
    "bf16": ("0x43004300", "0x3F803F80", "0xC308C308", "bf16x2"),
    "fp16": ("0x64006400", "0x3C003C00", "0xE408E408", "f16x2"),
}


# int8 bytes -> fp32 for the single-row kernel, with no conversion instruction (I2F runs at an eighth of the FMA
# rate on an H200, and one row's product was bound by it): the bytes are XORed with 0x80 (q + 128, unsigned),
# prmt builds each word [byte, 0, 0, 0x4B], the float 2**23 + q + 128 exactly, and one add takes 2**23 + 128 off.
# (The same for int4's nibbles, in place of the bf16 unpack and its conversion, measured no faster.)
_ASM_INT8_F32 = tl.constexpr("\n".join(
    ["{", ".reg .b32 t;", "xor.b32 t, $4, 0x80808080;"]
    + [f"prmt.b32 ${i}, t, 0x4B000000, 0x754{i};" for i in range(4)]
    + [f"add.f32 ${i}, ${i}, 0fCB000080;" for i in range(4)] + ["}"]))


# One row's int4 product, eight weights (one 32-bit word of the int4 layout: bytes r..r+3 of a K tile) at a time, in
# packed bf16x2/f16x2 arithmetic: the nibbles become (q_j, q_j+1) pairs as in quant_matmul's _asm_unpack, and each
# pair meets the two x values it multiplies, which sit side by side in memory (low nibbles: elements r..r+3 of the
# tile, high ones: H + r..r+3), so x arrives as two 64-bit loads. Two packed fmas per pair (offset off, then the
# product into a pair of sums), the two halves then added in fp32: about 3 SASS instructions per weight in the loop,
# against about 6 for unpacking to fp32 first. With group scales the asm takes two words (pack=2) and their tile's
# (low, high) scale pair, and scales the low and high sums (packed) before they meet.
def _asm_dot4(dtype: str, scaled: bool) -> str:
    magic, one, neg, ty = _MAGIC[dtype]
    words = 2 if scaled else 1
    lines = [".reg .b32 t, s, u0, u1, u2, u3, x0, x1, x2, x3, one, neg, zero, p, q;",
             ".reg .b16 l, h;", ".reg .f32 fl, fh;",
             f"mov.b32 one, {one};", f"mov.b32 neg, {neg};", "mov.b32 zero, 0x80008000;"]
    if scaled:  # $0 $1 out; $2 $3 words; $4 $5 low quads; $6 $7 high quads; $8 (low scale, high scale)
        lines += [".reg .b32 slo, shi;", "mov.b32 {l, h}, $8;", "mov.b32 slo, {l, l};", "mov.b32 shi, {h, h};"]
    for k in range(words):
        w, xl, xh = (f"${2 + k}", f"${4 + k}", f"${6 + k}") if scaled else ("$1", "$2", "$3")
        lines += [f"mov.b64 {{x0, x1}}, {xl};", f"mov.b64 {{x2, x3}}, {xh};",
                  f"prmt.b32 t, {w}, 0, 0x3120;",
                  f"lop3.b32 u0, t, 0x000F000F, {magic}, 0xEA;",
                  "shr.b32 s, t, 8;", f"lop3.b32 u1, s, 0x000F000F, {magic}, 0xEA;",
                  "shr.b32 s, t, 4;", f"lop3.b32 u2, s, 0x000F000F, {magic}, 0xEA;",
                  "shr.b32 s, t, 12;", f"lop3.b32 u3, s, 0x000F000F, {magic}, 0xEA;"]
        lines += [f"fma.rn.{ty} u{i}, u{i}, one, neg;" for i in range(4)]
        if scaled:  # low and high halves lie in different groups: sum them apart, scale, add
            lines += [f"fma.rn.{ty} p, u0, x0, zero;", f"fma.rn.{ty} p, u1, x1, p;",
                      f"fma.rn.{ty} q, u2, x2, zero;", f"fma.rn.{ty} q, u3, x3, q;",
                      f"fma.rn.{ty} p, p, slo, zero;", f"fma.rn.{ty} p, q, shi, p;"]
        else:
            lines += [f"fma.rn.{ty} p, u0, x0, zero;", f"fma.rn.{ty} p, u1, x1, p;",
                      f"fma.rn.{ty} p, u2, x2, p;", f"fma.rn.{ty} p, u3, x3, p;"]
        if dtype == "bf16":  # a bf16's bits are the top half of the fp32 of the same value
            lines += ["shl.b32 s, p, 16;", "and.b32 p, p, 0xFFFF0000;", f"add.f32 ${k}, s, p;"]
        else:
            lines += ["mov.b32 {l, h}, p;", "cvt.f32.f16 fl, l;", "cvt.f32.f16 fh, h;", f"add.f32 ${k}, fl, fh;"]
    return "{\n" + "\n".join(lines) + "\n}"


_ASM_DOT4_BF16 = tl.constexpr(_asm_dot4("bf16", False))
_ASM_DOT4_FP16 = tl.constexpr(_asm_dot4("fp16", False))
_ASM_DOT4_SCALED_BF16 = tl.constexpr(_asm_dot4("bf16", True))
_ASM_DOT4_SCALED_FP16 = tl.constexpr(_asm_dot4("fp16", True))


@triton.jit
def _dot_int4_word(w, xl, xh, sc, IS_BF16: tl.constexpr, SCALED: tl.constexpr, FAST: tl.constexpr):
    """int32 words of the int4 layout (nibbles q + 8), the int64 quads of x their low / high nibbles meet, and
    (SCALED) each word's tile scales, even words holding the low halves', odd ones the high halves' -> each
    word's (scaled) sum in fp32, w's shape."""
    if FAST:
        if SCALED:
            if IS_BF16:
                return tl.inline_asm_elementwise(_ASM_DOT4_SCALED_BF16, "=r,=r,r,r,l,l,l,l,r", [w, xl, xh, sc],
                                                 dtype=tl.float32, is_pure=True, pack=2)
            else:
                return tl.inline_asm_elementwise(_ASM_DOT4_SCALED_FP16, "=r,=r,r,r,l,l,l,l,r", [w, xl, xh, sc],
                                                 dtype=tl.float32, is_pure=True, pack=2)
        else:
            if IS_BF16:
                return tl.inline_asm_elementwise(_ASM_DOT4_BF16, "=r,r,l,l", [w, xl, xh], dtype=tl.float32,
                                                 is_pure=True, pack=1)
            else:
                return tl.inline_asm_elementwise(_ASM_DOT4_FP16, "=r,r,l,l", [w, xl, xh], dtype=tl.float32,
                                                 is_pure=True, pack=1)
    else:  # the interpreter: the same sums in fp32, the scale pairs swapped within each pair of words
        lo = tl.zeros(w.shape, tl.float32)
        hi = tl.zeros(w.shape, tl.float32)
        for j in tl.static_range(4):
            if IS_BF16:
                a_lo = ((xl >> (16 * j)) & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
                a_hi = ((xh >> (16 * j)) & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
            else:
                a_lo = ((xl >> (16 * j)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
                a_hi = ((xh >> (16 * j)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            lo += (((w >> (8 * j)) & 0xF) - 8).to(tl.float32) * a_lo.to(tl.float32)
            hi += (((w >> (8 * j + 4)) & 0xF) - 8).to(tl.float32) * a_hi.to(tl.float32)
        if SCALED:
            A: tl.constexpr = sc.shape[0]
            B: tl.constexpr = sc.shape[1]
            C: tl.constexpr = sc.shape[2]
            s_lo, s_hi = tl.split(tl.reshape(sc.to(tl.float32), (A, B, C // 2, 2)))
            s_lo = tl.reshape(tl.join(s_lo, s_lo), (A, B, C))
            s_hi = tl.reshape(tl.join(s_hi, s_hi), (A, B, C))
            return lo * s_lo + hi * s_hi
        return lo + hi


@triton.jit
def _int8_to_f32(b, FAST: tl.constexpr):
    """int8 bytes -> fp32, b's shape."""
    if FAST:
        return tl.inline_asm_elementwise(_ASM_INT8_F32, "=r,=r,=r,=r,r", [b], dtype=tl.float32, is_pure=True,
                                         pack=4)
    else:
        return b.to(tl.float32)


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, N, K, row_bytes, stride_wn, EVEN: tl.constexpr,
                      HAS_BIAS: tl.constexpr, FAST_UNPACK: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_B: tl.constexpr, PDL: tl.constexpr):
    """One row of x, int8: each program owns BLOCK_N output rows and walks their bytes BLOCK_B at a time, products
    in fp32 reduced per step (no tensor cores: a single row would waste 15/16 of an mma tile's loads). Summing
    element-wise and reducing once at the end, with the bytes read to share x's register layout, measured slower
    (more registers, fewer programs in flight). The first block is loaded before waiting on the previous kernel
    (kernels/pdl.py)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = tl.minimum(offs_n, N - 1)  # the last tile's missing rows read row N - 1 again and are not stored
    rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    offs_b = tl.arange(0, BLOCK_B)
    if PDL:  # kernels/pdl.py: the first bytes are read while the previous kernel finishes
        gdc_launch_dependents()
    w = _weight_tile(rows, offs_b, row_bytes, EVEN)
    if PDL:
        gdc_wait()
    total = tl.zeros((BLOCK_N,), tl.float32)
    total += _int8_sums(w, x_ptr, offs_b, K, FAST_UNPACK)
    for b0 in range(BLOCK_B, row_bytes, BLOCK_B):
        j = b0 + offs_b
        total += _int8_sums(_weight_tile(rows, j, row_bytes, EVEN), x_ptr, j, K, FAST_UNPACK)
    total *= tl.load(s_ptr + n)  # one fp32 scale per row, once
    if HAS_BIAS:  # added in fp32, before the one rounding to the output dtype
        total += tl.load(b_ptr + n).to(tl.float32)
    tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _int8_sums(w, x_ptr, j, K, FAST_UNPACK: tl.constexpr):
    """Each row's sum of its bytes w times x's elements j, in fp32."""
    a = tl.load(x_ptr + j, mask=j < K, other=0.0)
    return tl.sum(_int8_to_f32(w, FAST_UNPACK) * a.to(tl.float32)[None, :], 1)


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, N, K4, row_words, stride_wn,
                      HALF: tl.constexpr, GROUPED: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                      IS_BF16: tl.constexpr, FAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                      PDL: tl.constexpr):
    """One row of x, int4: each program owns BLOCK_N output rows and walks them BLOCK_W 32-bit words at a time
    (_dot_int4_word: packed arithmetic). x_ptr is x as int64 quads (K4 of them), w_ptr the weight as int32, s_ptr
    the scales (per row, or GROUPED [K tiles, N, 2] pairs), b_ptr the bias (read if HAS_BIAS). EVEN: whole
    blocks, x covers them all (no masks).

    Tensors are [K tiles, rows, words of a tile]: Triton spreads threads over words and tiles and keeps a thread's
    rows in its registers, so x, loaded as [K tiles, 1, words], is read once per thread for all its rows. Words,
    x quads and scale pairs are all read two elements at a time (8-byte words, 16-byte quads, 4-byte pairs), so
    they share one register layout: nothing moves between threads inside the loop, and the sums stay element-wise
    until the end. The first block's words are loaded before waiting on the previous kernel (kernels/pdl.py)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = tl.minimum(offs_n, N - 1)[None, :, None]  # the last tile's missing rows read row N - 1 again, unstored
    Q: tl.constexpr = HALF // 4  # words per K tile
    T: tl.constexpr = BLOCK_W // Q  # K tiles per block
    t = tl.arange(0, T)[:, None, None]
    q = tl.arange(0, Q)[None, None, :]
    q2 = (q // 2) * 2 + q % 2  # known contiguous in pairs only: words are read as x's quads are, two at a time
    w_ptrs = w_ptr + n.to(tl.int64) * stride_wn + t * Q + q2
    x_ptrs = x_ptr + t * (2 * Q) + q  # the x quad of each word's low nibbles (the high ones': Q further)
    s_ptrs = s_ptr + (t * N + n) * 2 + q % 2  # even words: the tile's low-half scale, odd words: the high half's
    word = t * Q + q
    if PDL:  # kernels/pdl.py: the first words are read while the previous kernel finishes
        gdc_launch_dependents()
    w = _int4_words(w_ptrs, word, row_words, EVEN)
    if PDL:
        gdc_wait()
    acc = tl.zeros((T, BLOCK_N, Q), tl.float32)
    acc += _int4_block(w, x_ptrs, s_ptrs, 0, t, q, K4, row_words, Q, T, IS_BF16, GROUPED, EVEN, FAST)
    for w0 in range(BLOCK_W, row_words, BLOCK_W):
        w_ptrs += BLOCK_W
        x_ptrs += 2 * BLOCK_W
        s_ptrs += T * N * 2
        w = _int4_words(w_ptrs, w0 + word, row_words, EVEN)
        acc += _int4_block(w, x_ptrs, s_ptrs, w0, t, q, K4, row_words, Q, T, IS_BF16, GROUPED, EVEN, FAST)
    total = tl.sum(tl.sum(acc, 2), 0)
    if not GROUPED:  # one fp32 scale per row, once
        total *= tl.load(s_ptr + tl.minimum(offs_n, N - 1))
    if HAS_BIAS:
        total += tl.load(b_ptr + tl.minimum(offs_n, N - 1)).to(tl.float32)
    tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _int4_words(w_ptrs, word, row_words, EVEN: tl.constexpr):
    """A block of weight words, `word` their offsets in the row (zeros past it: x is 0 there)."""
    if EVEN:
        return tl.load(w_ptrs)
    return tl.load(w_ptrs, mask=word < row_words, other=0)


@triton.jit
def _int4_block(w, x_ptrs, s_ptrs, w0, t, q, K4, row_words, Q: tl.constexpr, T: tl.constexpr,
                IS_BF16: tl.constexpr, GROUPED: tl.constexpr, EVEN: tl.constexpr, FAST: tl.constexpr):
    """One block's words w (from word w0 of the rows) times their x quads, scaled per tile if GROUPED."""
    if EVEN:
        xl = tl.load(x_ptrs)
        xh = tl.load(x_ptrs + Q)
    else:
        xl = tl.load(x_ptrs, mask=2 * w0 + t * (2 * Q) + q < K4, other=0)
        xh = tl.load(x_ptrs + Q, mask=2 * w0 + t * (2 * Q) + q + Q < K4, other=0)
    if GROUPED:
        if EVEN:
            sc = tl.load(s_ptrs)
        else:
            sc = tl.load(s_ptrs, mask=w0 // Q + t < row_words // Q, other=0.0)
    else:
        sc = w  # unused
    return _dot_int4_word(w, xl, xh, sc, IS_BF16, GROUPED, FAST)
