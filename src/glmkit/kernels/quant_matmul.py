"""Weight-only quantized matmul for CUDA (Triton): y = x @ dequantize(weight).T, W8A16 and W4A16.

    mm = QuantMatmul(bits, qweight, scales, group_size, dtype, bias=None, int8_activations=0)
            repacks the weight once (tensors it keeps); int8_activations 1 or 2 (int8 weights, int8a8): rows of
            2 or more go to kernels/int8_matmul.py, x quantized per row (in two halves with 2)
    mm(x)   x [M, K] bf16/fp16 -> [M, N] in x's dtype (+ bias, added in fp32 before the one rounding); one Triton
            launch, or from DEQUANT_ROWS rows on (prompts) a dequantizing launch and cuBLAS (_dequantized)

Weight layouts the kernel reads (built from models/quant.py's portable layouts at construction; this module
decodes those bytes itself rather than import the models layer, which imports it). Both keep each output row's
bytes contiguous along K, so a thread's bytes for the tensor-core fragment sit together in shared memory and
unpack with 32-bit operations:

* int8: `qweight` int8 [N, K_pad], the portable layout itself (zero columns only if K is not a multiple of 128:
  otherwise no copy is made). `scales` fp32 [N], applied once to the fp32 accumulator at the end (exact).
* int4: `qweight` int8 [N, K_pad/2], packed per K tile of BLOCK_K = 2*H elements: byte t*H + r of a row holds
  element t*BLOCK_K + r in its low nibble and element t*BLOCK_K + H + r in its high nibble, each stored as
  q + 8 (0..15). So one tile's bytes give two [H, BLOCK_N] weight halves that pair with two contiguous
  [BLOCK_M, H] slices of x, and nothing is interleaved in registers. The nibbles become bf16/fp16 without
  integer-to-float conversions: ORed into the mantissa of 128.0 (bf16) or 1024.0 (fp16), then one packed fma
  subtracts 136 (1032); eight values per 12 instructions (inline PTX, `_unpack_int4`). H divides the group size,
  so each half lies in one group:
    - one group per row (ChatGLM's checkpoints): `scales` fp32 [N], applied to the accumulator at the end;
    - several groups: `scales` [K tiles, N, 2] in the activation dtype, each tile's (low half, high half) group
      scales side by side (one 4-byte load; the single-row kernel pairs them with two words, see _asm_dot4).
      Decode tiles (BLOCK_M <= 32) scale each half's fp32 partial product after its tl.dot (cheap for few rows, and
      exact); larger tiles scale the dequantized weight halves before the tl.dot (cheaper per multiply-add when
      BLOCK_M is large).
  H = 64 for group sizes that are multiples of 64 (and one group per row), 32 for 32, 16 for 16; other group
  sizes are refused.

One row (a batch-1 decode step) goes through a kernel of its own (kernels/quant_gemv.py, tiles from
QuantMatmul.gemv_config): each program reads BLOCK_N weight rows BLOCK_B bytes at a time and multiplies them in fp32
without tensor cores, which for one row would load 16 rows of x per mma tile and waste 15 of them. int8 converts
bytes to fp32 (prmt magic); int4 multiplies in packed bf16x2/f16x2 arithmetic (_int4_gemv_kernel, _asm_dot4), its
tensors laid out so that nothing crosses threads inside the loop.

Tiles (QuantMatmul.config(M), picked from sweeps on an H200): each program computes one [BLOCK_M, BLOCK_N]
output tile, tl.dot with fp32 accumulation (mma.sync for BLOCK_M < 64, wgmma above).
* M <= 16 (decode): BLOCK_M = 16, BLOCK_N = 128 (int8: 64); M <= 64: BLOCK_M = 32 / 64; larger M: 64 or 128.
  Programs sharing an N tile are adjacent in launch order, so a weight tile comes from DRAM about once and from
  L2 for the other M tiles.
* Split-K: when the output tiles alone cannot fill the GPU (decode with N up to a few thousand, or a long K),
  the K loop is split over SPLIT_K programs per tile; each writes its fp32 partial to a scratch buffer, and the
  last to finish (a per-tile counter that it resets) adds the partials in split order, so the result does not
  depend on timing.

CUDA graphs: the launch depends only on M and construction-time constants; a call allocates only its output (and
with split-K the fp32 scratch, through the caching allocator) and never synchronizes with the host. The first
call of each tile configuration compiles: warm up before capturing.

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported) on
CPU tensors; that is how the tests run on machines without CUDA. The interpreter cannot run inline PTX, so there
the nibbles are unpacked with plain integer operations (same layout, same results).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import int8_matmul, pdl
from .quant_gemv import _MAGIC, _int4_gemv_kernel, _int8_gemv_kernel, _int8_to_f32
from .split_k import store_tile

# Nibbles -> floats, four bytes (eight values) per asm block: byte j's low nibble becomes element j of the first
# result, its high nibble element j of the second. prmt reorders the bytes (b0, b2, b1, b3) so that one
# mask keeps the nibbles of b0 and b1 in the two 16-bit halves of a register: (magic | u) is magic + u exactly,
# and fma(., 1, -(magic + 8)) gives u - 8 = q (_MAGIC's constants).
def _asm_unpack(dtype: str) -> str:
    magic, one, neg, ty = _MAGIC[dtype]
    lines = [".reg .b32 t, u0, u1, u2, u3, one, neg;",
             "prmt.b32 t, $4, 0, 0x3120;",
             f"lop3.b32 u0, t, 0x000F000F, {magic}, 0xEA;",  # 0xEA: (a & b) | c
             "shr.b32 u1, t, 8;", f"lop3.b32 u1, u1, 0x000F000F, {magic}, 0xEA;",
             "shr.b32 u2, t, 4;", f"lop3.b32 u2, u2, 0x000F000F, {magic}, 0xEA;",
             "shr.b32 u3, t, 12;", f"lop3.b32 u3, u3, 0x000F000F, {magic}, 0xEA;",
             f"mov.b32 one, {one};", f"mov.b32 neg, {neg};"]
    lines += [f"fma.rn.{ty} ${i}, u{i}, one, neg;" for i in range(4)]
    return "{\n" + "\n".join(lines) + "\n}"


_ASM_BF16 = tl.constexpr(_asm_unpack("bf16"))
_ASM_FP16 = tl.constexpr(_asm_unpack("fp16"))

@triton.jit
def _unpack_int4(b, dtype: tl.constexpr, FAST: tl.constexpr):
    """int8 bytes (nibbles stored as q + 8) -> (low-nibble values, high-nibble values) in `dtype`, b's shape."""
    if FAST:
        if dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(_ASM_BF16, "=r,=r,=r,=r,r", [b], dtype=(tl.bfloat16, tl.bfloat16),
                                             is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(_ASM_FP16, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                             is_pure=True, pack=4)
    else:
        lo = ((b & 0xF) - 8).to(tl.float32).to(dtype)
        hi = (((b >> 4) & 0xF) - 8).to(tl.float32).to(dtype)
        return lo, hi


@triton.jit
def _quant_matmul_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, k_tiles, tiles_per_split,
    BITS: tl.constexpr, SCALE_MODE: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    FAST_UNPACK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # SCALE_MODE 0: one fp32 scale per column, at the end; 1: group scales on the weight halves before tl.dot;
    # 2: group scales on each half's fp32 partial product.
    grid_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % grid_m  # programs sharing an N tile run side by side: its weight bytes come from L2 after one
    pid_n = pid // grid_m
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_cols = w_ptr + offs_n[None, :] * stride_wn  # [1, BLOCK_N]; K runs along each weight row

    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if BITS == 8:
        offs_k = tl.arange(0, BLOCK_K)
        for t in range(t_begin, t_end):
            k = t * BLOCK_K + offs_k
            if EVEN_K:
                a = tl.load(x_rows + k[None, :], mask=mask_m[:, None], other=0.0)
            else:
                a = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & (k[None, :] < K), other=0.0)
            q = tl.load(w_cols + k[:, None], mask=mask_n[None, :], other=0)
            acc = tl.dot(a, _int8_to_f32(q, FAST_UNPACK).to(a.dtype), acc)  # exact: |q| <= 128
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        offs_h = tl.arange(0, HALF)
        for t in range(t_begin, t_end):
            k_lo = t * BLOCK_K + offs_h
            k_hi = k_lo + HALF
            if EVEN_K:
                a_lo = tl.load(x_rows + k_lo[None, :], mask=mask_m[:, None], other=0.0)
                a_hi = tl.load(x_rows + k_hi[None, :], mask=mask_m[:, None], other=0.0)
            else:
                a_lo = tl.load(x_rows + k_lo[None, :], mask=mask_m[:, None] & (k_lo[None, :] < K), other=0.0)
                a_hi = tl.load(x_rows + k_hi[None, :], mask=mask_m[:, None] & (k_hi[None, :] < K), other=0.0)
            b = tl.load(w_cols + (t * HALF + offs_h)[:, None], mask=mask_n[None, :], other=0)
            w_lo, w_hi = _unpack_int4(b, a_lo.dtype, FAST_UNPACK)
            if SCALE_MODE == 0:
                acc = tl.dot(a_lo, w_lo, acc)
                acc = tl.dot(a_hi, w_hi, acc)
            else:
                # this K tile's (low half, high half) group scales, one 4-byte load per column
                pair = s_ptr + (t * N + offs_n)[:, None] * 2 + tl.arange(0, 2)[None, :]
                s_lo, s_hi = tl.split(tl.load(pair, mask=mask_n[:, None], other=0.0))
                if SCALE_MODE == 1:
                    acc = tl.dot(a_lo, w_lo * s_lo[None, :], acc)
                    acc = tl.dot(a_hi, w_hi * s_hi[None, :], acc)
                else:
                    acc += tl.dot(a_lo, w_lo) * s_lo.to(tl.float32)[None, :]
                    acc += tl.dot(a_hi, w_hi) * s_hi.to(tl.float32)[None, :]

    if SCALE_MODE == 0:  # one scale per output column: exact, in fp32, once
        scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc * scale[None, :]

    store_tile(acc, b_ptr, out_ptr, partial_ptr, counter_ptr, offs_m, offs_n, M, N, stride_om, pid_m, pid_n, pid_k,
               HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, out_ptr, row0, row_end, N, K, stride_wn, BITS: tl.constexpr,
                       GROUPED: tl.constexpr, FAST_UNPACK: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Weight rows [row0, row_end) in the activation dtype, into out [row_end - row0, K] (contiguous): one
    [BLOCK_N, BLOCK_K] tile per program (BLOCK_K: int4's packing tile). Scaled in fp32 (int8, int4 with one scale
    per row) or in the activation dtype (group scales, as the tiled kernel's large tiles scale weight halves)."""
    offs_n = row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < row_end
    rows = offs_n.to(tl.int64)[:, None]
    out_ptr += (rows - row0) * K
    if BITS == 8:
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        q = tl.load(w_ptr + rows * stride_wn + k[None, :], mask=mask_n[:, None], other=0)
        w = _int8_to_f32(q, FAST_UNPACK) * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
        tl.store(out_ptr + k[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & (k[None, :] < K))
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        t = tl.program_id(1)
        h = tl.arange(0, HALF)
        b = tl.load(w_ptr + rows * stride_wn + (t * HALF + h)[None, :], mask=mask_n[:, None], other=0)
        w_lo, w_hi = _unpack_int4(b, out_ptr.dtype.element_ty, FAST_UNPACK)
        if GROUPED:
            pair = s_ptr + (t * N + offs_n)[:, None] * 2 + tl.arange(0, 2)[None, :]
            s_lo, s_hi = tl.split(tl.load(pair, mask=mask_n[:, None], other=0.0))
            w_lo = w_lo * s_lo[:, None]
            w_hi = w_hi * s_hi[:, None]
        else:
            scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
            w_lo = w_lo.to(tl.float32) * scale
            w_hi = w_hi.to(tl.float32) * scale
        k_lo = t * BLOCK_K + h[None, :]
        tl.store(out_ptr + k_lo, w_lo.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & (k_lo < K))
        k_hi = k_lo + HALF
        tl.store(out_ptr + k_hi, w_hi.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & (k_hi < K))


def _pad_dim(t: torch.Tensor, dim: int, size: int, value: int = 0) -> torch.Tensor:
    """t with `value` appended along `dim` up to `size` (t itself if it is that long)."""
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def _offset_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """Portable int4 bytes [N, K/2] (two signed nibbles, element 2k in the high one) -> q + 8, uint8 [N, K].

    A signed nibble's bits XOR 8 are q + 8 (0..15), so no sign extension is needed."""
    b = qweight.view(torch.uint8)
    return torch.stack([b >> 4, b & 0x0F], dim=-1).flatten(-2) ^ 8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class QuantMatmul:
    """x [M, K] (bf16/fp16) @ dequantized weight [N, K].T -> [M, N] in x's dtype, on CUDA (see the module doc).

    Keeps the weight in the kernel's layout as `qweight` / `scales`. The caller's tensors are only read; for int4
    (and int8 with K not a multiple of 128) these are new tensors, so the caller may drop its own copies.
    """

    # Split K while the output tiles cannot fill the GPU: up to about PROGRAMS_PER_SM programs per SM for M <= 64
    # (measured on an H200: int8 and multi-group int4 tiles do more work per byte and like more programs in
    # flight), two waves for larger M; at most MAX_SPLIT_K splits of at least MIN_TILES_PER_SPLIT K tiles each,
    # and fp32 partials (written, then read back) of at most the scratch limit.
    PROGRAMS_PER_SM = {"int8": 4, "int4": 2, "int4-groups": 8}
    MIN_TILES_PER_SPLIT = 4
    MAX_SPLIT_K = 8
    MAX_SCRATCH_DECODE = 8 << 20  # M <= 64, and at most a quarter of the weight's bytes
    MAX_SCRATCH_PREFILL = 16 << 20
    # From DEQUANT_ROWS rows on (prompts), the weight is dequantized into a scratch buffer of at most
    # DEQUANT_SCRATCH bytes at a time and multiplied by cuBLAS (see _dequantized).
    DEQUANT_ROWS = 512
    DEQUANT_SCRATCH = 256 << 20

    def __init__(self, bits: int, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                 dtype: torch.dtype, bias: torch.Tensor | None = None, int8_activations: int = 0):
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        if int8_activations not in (0, 1, 2) or (int8_activations and bits != 8):
            raise ValueError(f"int8_activations must be 0, or 1 or 2 (halves) with int8 weights, not "
                             f"{int8_activations} with int{bits}")
        self.int8_activations = int8_activations
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"activations must be bfloat16 or float16, not {dtype}")
        self.bits, self.dtype = bits, dtype
        self.N = qweight.shape[0]
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.K = qweight.shape[1] * (2 if bits == 4 else 1)
        device = qweight.device
        with torch.no_grad():
            if bits == 8:
                self.block_k = 128 if self.K > 64 else max(32, triton.next_power_of_2(self.K))
                self.k_pad = triton.cdiv(self.K, self.block_k) * self.block_k
                self.qweight = _pad_dim(qweight, 1, self.k_pad).contiguous()
                self.scales = scales.reshape(self.N).to(torch.float32).contiguous()
                self.scale_per_group = False
            else:
                groups = scales.shape[1] if scales.dim() == 2 else 1
                if groups > 1 and self.K != groups * group_size:
                    raise ValueError(f"{groups} scale groups do not split K={self.K} into groups of {group_size}")
                half = self._int4_half(self.K, group_size, groups)
                self.block_k = 2 * half
                self.k_pad = triton.cdiv(self.K, self.block_k) * self.block_k
                u = _pad_dim(_offset_nibbles(qweight), 1, self.k_pad, value=8)  # [N, K_pad], 0..15 (pad: q = 0)
                u = u.view(self.N, self.k_pad // self.block_k, 2, half)
                packed = (u[:, :, 1].to(torch.int32) << 4) | u[:, :, 0].to(torch.int32)  # 0..255
                self.qweight = packed.to(torch.uint8).view(torch.int8).reshape(self.N, self.k_pad // 2)
                del packed
                del u
                self.scale_per_group = groups > 1
                if self.scale_per_group:  # [K tiles, N, 2]: each tile's (low half, high half) group scales
                    by_group = _pad_dim(scales.t().to(dtype), 0, triton.cdiv(self.k_pad, group_size))  # zero pad
                    start = torch.arange(0, self.k_pad, self.block_k, device=device)
                    self.scales = torch.stack([by_group[start // group_size], by_group[(start + half) // group_size]],
                                              dim=-1).contiguous()
                    del by_group
                else:
                    self.scales = scales.reshape(self.N).to(torch.float32).contiguous()
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 132)
        self.fast_unpack = not _interpreting()
        # Per-tile arrival counters for split-K (enough for any split config _choose makes), zero between launches.
        self._counters = torch.zeros(max(triton.cdiv(self.N, 32), 2 * self.num_sms), dtype=torch.int32, device=device)
        self._configs: dict[int, tuple] = {}
        self.gemv_tiles = self.gemv_config(bits, self.N, self.K)
        self.dequant_rows = self.DEQUANT_ROWS
        if int8_activations:
            self.row_sums = int8_matmul.weight_row_sums(self.qweight)
            if int8_activations == 1:  # one int8 half outruns dequantize + cuBLAS at every size measured; two
                self.dequant_rows = 1 << 62  # halves (qkv) lose to it from 512 rows (benchmarks/gemv.py --rows)

    @staticmethod
    def gemv_config(bits: int, N: int, K: int) -> tuple[int, int, int] | None:
        """(BLOCK_N, BLOCK_B, num_warps) of the single-row kernels (None, as benchmarks set it, sends one row to
        the tiled kernel). From sweeps on an H200 over ChatGLM3-6B's linears (`benchmarks/gemv.py --quant int8
        int4 --sweep`): int4 8 rows x 512 bytes (8 warps for N <= 8192), 1,024 bytes for K >= 8192; int8 4 x 2,048
        bytes, 1.04-1.43x the tiled kernel."""
        if bits == 4:
            if K >= 8192:
                return 8, 1024, 4
            return (8, 512, 8) if N <= 8192 else (8, 512, 4)
        return 4, 2048, 4

    @staticmethod
    def _int4_half(K: int, group_size: int, groups: int) -> int:
        """Half the K tile: a divisor of the group size (each half in one group), at least 16 for tl.dot."""
        if groups == 1:
            return 64 if K > 64 else max(16, triton.next_power_of_2(triton.cdiv(K, 2)))
        for half in (64, 32, 16):
            if group_size % half == 0:
                return half
        raise ValueError(f"int4 group size {group_size} is not a multiple of 16")

    def config(self, M: int) -> tuple:
        """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for M rows: a function of M and of the
        weight's shape alone."""
        cfg = self._configs.get(M)
        if cfg is None:
            cfg = self._configs[M] = self._choose(M)
        return cfg

    def _choose(self, M: int) -> tuple:
        """Tile shapes from sweeps on an H200 over GLM-4-9B's linears (N, K up to 27392, 13696; M = 1 to 256)."""
        N, sms, bk = self.N, self.num_sms, self.block_k  # bk: int4 fixed by the packing; int8 a power of two <= 128
        kind = "int8" if self.bits == 8 else "int4-groups" if self.scale_per_group else "int4"
        warps, stages = 4, 3
        if M <= 64:  # weight-bound
            block_m = 16 if M <= 16 else 32 if M <= 32 else 64
            if M <= 16:
                block_n = 64 if kind == "int8" else 128
            else:
                block_n = 128 if triton.cdiv(N, 128) >= sms else 64
                if kind == "int4-groups" and M > 32 and triton.cdiv(N, 256) >= sms // 2:
                    block_n = 256
            target = self.PROGRAMS_PER_SM[kind] * sms
            scratch = min(self.MAX_SCRATCH_DECODE, self.qweight.numel() // 4)
        else:
            if kind == "int4-groups":  # scaling the weight halves costs per element: wide N tiles amortize x
                block_m = 64
                block_n = 256 if triton.cdiv(M, 64) * triton.cdiv(N, 256) >= sms else 128
            elif kind == "int8":
                block_m = 128 if triton.cdiv(M, 128) * triton.cdiv(N, 128) >= sms else 64
                block_n, bk = 128, min(bk, 64)
            else:
                block_m, block_n = 128, 128
            target, scratch = 2 * sms, self.MAX_SCRATCH_PREFILL
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
        want = target / tiles
        split = min(2 ** round(math.log2(want)) if want > 1 else 1, self.MAX_SPLIT_K)
        while split > 1 and ((self.k_pad // bk) // split < self.MIN_TILES_PER_SPLIT
                             or split * M * N * 4 > scratch or tiles > self._counters.numel()):
            split //= 2
        if M > 64 and kind == "int4":  # 2 stages let two programs share an SM when there are waves of them
            stages = 2 if tiles * split >= 2 * sms else 4
        return block_m, block_n, bk, split, warps, stages

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        M, K = x.shape
        if K != self.K:
            raise ValueError(f"x has {K} columns, the weight {self.K}")
        if x.stride(1) != 1:
            x = x.contiguous()
        if M >= self.dequant_rows:
            return self._dequantized(x)
        out = torch.empty(M, self.N, dtype=x.dtype, device=x.device)
        if M == 0:
            return out
        if M == 1 and self.gemv_tiles is not None and (self.bits == 8 or (K % 4 == 0 and x.data_ptr() % 8 == 0)):
            return self._gemv(x, out, *self.gemv_tiles)  # int4 reads x as 8-byte quads
        if self.int8_activations:
            q, qs = int8_matmul.quantize_rows(x, self.k_pad, self.int8_activations)
            cfg = int8_matmul.config(M, self.N, self.k_pad // self.block_k, self.num_sms, self._counters.numel())
            return int8_matmul.int8_matmul(q, qs, self.qweight, self.scales, self.row_sums, self.bias, out,
                                           self._counters, self.block_k, cfg)
        block_m, block_n, block_k, split, warps, stages = self.config(M)
        k_tiles = self.k_pad // block_k
        tiles_per_split = triton.cdiv(k_tiles, split)
        split = triton.cdiv(k_tiles, tiles_per_split)  # no empty splits
        partial = torch.empty(split, M, self.N, dtype=torch.float32, device=x.device) if split > 1 else out
        scale_mode = 0 if not self.scale_per_group else 2 if block_m <= 32 else 1
        grid = (triton.cdiv(M, block_m) * triton.cdiv(self.N, block_n), split)
        _quant_matmul_kernel[grid](
            x, self.qweight, self.scales, self._bias_arg(), out, partial, self._counters,
            M, self.N, K, x.stride(0), self.qweight.stride(0), out.stride(0), k_tiles, tiles_per_split,
            BITS=self.bits, SCALE_MODE=scale_mode, EVEN_K=K % block_k == 0, HAS_BIAS=self.bias is not None,
            FAST_UNPACK=self.fast_unpack,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
            num_warps=warps, num_stages=stages,
        )
        return out

    def _gemv(self, x: torch.Tensor, out: torch.Tensor, block_n: int, block_b: int, warps: int) -> torch.Tensor:
        """The single-row kernels: x [1, K] -> out [1, N]."""
        grid = (triton.cdiv(self.N, block_n),)
        if self.bits == 8:
            row_bytes = self.qweight.shape[1]
            _int8_gemv_kernel[grid](
                x, self.qweight, self.scales, self._bias_arg(), out, self.N, self.K, row_bytes,
                self.qweight.stride(0), EVEN=row_bytes % block_b == 0, HAS_BIAS=self.bias is not None,
                FAST_UNPACK=self.fast_unpack, BLOCK_N=block_n, BLOCK_B=block_b, num_warps=warps, num_stages=1,
                **pdl.launch(x.device, "int8_gemv"))
            return out
        if block_n * block_b // 4 < 64 * warps:
            raise ValueError(f"int4 single-row tile {block_n} x {block_b} bytes gives a thread of {warps} warps "
                             "fewer than two words: the packed product pairs them (use a larger tile)")
        w = self.qweight.view(torch.int32)
        row_words = w.shape[1]
        _int4_gemv_kernel[grid](
            x.view(torch.int64), w, self.scales, self._bias_arg(), out, self.N, self.K // 4, row_words, w.stride(0),
            HALF=self.block_k // 2, GROUPED=self.scale_per_group,
            EVEN=row_words % (block_b // 4) == 0 and self.K == self.k_pad, HAS_BIAS=self.bias is not None,
            IS_BF16=x.dtype == torch.bfloat16,
            FAST=self.fast_unpack, BLOCK_N=block_n, BLOCK_W=block_b // 4, num_warps=warps, num_stages=1,
            **pdl.launch(x.device, "int4_gemv"))
        return out

    def _bias_arg(self) -> torch.Tensor:
        """The kernels' bias pointer: the bias, or (HAS_BIAS off, never read) the scales."""
        return self.scales if self.bias is None else self.bias

    def _dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows (a prompt): the weight dequantized into the activation dtype, DEQUANT_SCRATCH bytes of rows at
        a time, then cuBLAS (bias in its epilogue). The tiled kernel converts every weight tile again for each
        BLOCK_M rows and runs at about half cuBLAS's bf16 pace there. On an H200, ChatGLM3-6B's gate_up, down
        and o as a fraction of bf16 cuBLAS's speed: 2,048 rows 0.85-0.89x this way against the tiled kernel's
        0.46-0.61x; 512 rows 0.61-0.65x against 0.39-0.51x; at 256 rows neither wins clearly (DEQUANT_ROWS)."""
        chunk = max(64, self.DEQUANT_SCRATCH // (2 * self.K) // 64 * 64)
        if chunk >= self.N:
            return F.linear(x, self._dequantize(0, self.N, x.dtype), self.bias)
        out = torch.empty(x.shape[0], self.N, dtype=x.dtype, device=x.device)
        for row0 in range(0, self.N, chunk):
            row_end = min(self.N, row0 + chunk)
            bias = None if self.bias is None else self.bias[row0:row_end]
            out[:, row0:row_end] = F.linear(x, self._dequantize(row0, row_end, x.dtype), bias)
        return out

    def _dequantize(self, row0: int, row_end: int, dtype: torch.dtype) -> torch.Tensor:
        """Weight rows [row0, row_end) as a new [rows, K] tensor in `dtype`."""
        w = torch.empty(row_end - row0, self.K, dtype=dtype, device=self.qweight.device)
        grid = (triton.cdiv(row_end - row0, 32), self.k_pad // self.block_k)
        _dequantize_kernel[grid](self.qweight, self.scales, w, row0, row_end, self.N, self.K, self.qweight.stride(0),
                                 BITS=self.bits, GROUPED=self.scale_per_group, FAST_UNPACK=self.fast_unpack,
                                 BLOCK_N=32, BLOCK_K=self.block_k, num_warps=4)
        return w
