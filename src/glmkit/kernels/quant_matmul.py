"""Weight-only quantized matmul for CUDA (Triton): y = x @ dequantize(weight).T, W8A16 and W4A16.

    QuantMatmul(bits, qweight, scales, group_size, dtype)   repacks the weight once (new tensors, kept here)
    QuantMatmul(...)(x)   x [M, K] in bf16/fp16 -> [M, N] in x's dtype, one Triton launch

The portable layouts (models/quant.py) come in; at construction the weight is repacked for the kernel:

* int8: `qweight` [K_pad, N] int8 (the transpose, zero rows up to a multiple of the K tile), `scales` fp32 [N].
  Each program's loads are rows of BLOCK_N consecutive bytes. The per-column scale is applied to the fp32
  accumulator once, at the end (exact).
* int4: `qweight` [K_pad/2, N] int8, packed per K tile of BLOCK_K = 2*H elements: byte row t*H + r holds element
  t*BLOCK_K + r in its low nibble and element t*BLOCK_K + H + r in its high nibble (both signed). So one tile's
  bytes give two [H, BLOCK_N] weight halves (`(b << 4) >> 4` and `b >> 4`) that pair with two contiguous
  [BLOCK_M, H] slices of x, and no interleaving is needed in registers. H divides the group size, so each half
  lies in one group:
    - one group per row (ChatGLM's checkpoints): `scales` fp32 [N], applied to the accumulator at the end;
    - several groups: `scales` [groups, N] in the activation dtype (half the bytes of fp32), multiplied into
      each dequantized half before its tl.dot.
  H = 64 for group sizes that are multiples of 64 (and one group per row), 32 for 32, 16 for 16; other group
  sizes are refused.

Tiles (each program computes one [BLOCK_M, BLOCK_N] output tile, fp32 accumulation with tl.dot):
* M <= 16 (decode): BLOCK_M = 16, BLOCK_N = 128 (64 if that gives too few programs), 4 warps. When the N tiles
  alone cannot fill the GPU (N up to a few thousand), the K loop is split over SPLIT_K programs per tile. Each
  writes its fp32 partial to a scratch buffer; the last to finish (a per-tile counter, reset by that program)
  adds the partials in split order, so the result does not depend on timing.
* larger M: BLOCK_M = 32 / 64 / 128, BLOCK_N = 128, 4 or 8 warps. Programs that share an N tile run next to each
  other, so a weight tile is read from DRAM about once and served from L2 to the other M tiles.

CUDA graphs: the launch depends only on M and the construction-time constants; the call allocates only its output
(and, with split-K, the fp32 scratch through the caching allocator), and never synchronizes with the host. The
first call of each tile configuration compiles: warm up before capturing.

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported) on
CPU tensors; that is how the tests run on machines without CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..models.quant import unpack_int4


# int4 -> bf16/fp16 without integer-to-float conversions: a nibble u (stored as q + 8) ORed into the mantissa of
# a "magic" float gives magic + u exactly; one packed fma then subtracts magic + 8. Four bytes (eight values) per
# asm block: byte j's low nibble -> element j of the first result, its high nibble -> element j of the second.
_SPLIT_NIBBLES = """
    prmt.b32 t, $IN, 0, 0x3120;
    lop3.b32 $0, t, 0x000F000F, MAGIC, 0xEA;
    shr.b32 u, t, 8;
    lop3.b32 $1, u, 0x000F000F, MAGIC, 0xEA;
    shr.b32 u, t, 4;
    lop3.b32 $2, u, 0x000F000F, MAGIC, 0xEA;
    shr.b32 u, t, 12;
    lop3.b32 $3, u, 0x000F000F, MAGIC, 0xEA;
"""
# (magic, 1.0, -(magic + 8), -0.0) as packed pairs, and the fma's type
_MAGIC = {
    "bf16": ("0x43004300", "0x3F803F80", "0xC308C308", "0x80008000", "bf16x2"),
    "fp16": ("0x64006400", "0x3C003C00", "0xE408E408", "0x80008000", "f16x2"),
}


def _asm_unpack(dtype: str, scaled: bool) -> str:
    magic, one, neg, negzero, ty = _MAGIC[dtype]
    body = _SPLIT_NIBBLES.replace("MAGIC", magic).replace("$IN", "$4")
    if scaled:  # $5/$6: low-half scales (pairs), $7/$8: high-half scales
        for out, sc in ((0, 5), (1, 6), (2, 7), (3, 8)):
            body += f"    fma.rn.{ty} ${out}, ${out}, {one}, {neg};\n"
            body += f"    fma.rn.{ty} ${out}, ${out}, ${sc}, {negzero};\n"
    else:
        for out in range(4):
            body += f"    fma.rn.{ty} ${out}, ${out}, {one}, {neg};\n"
    return "{\n    .reg .b32 t, u;\n" + body + "}"


_ASM_BF16 = tl.constexpr(_asm_unpack("bf16", False))
_ASM_FP16 = tl.constexpr(_asm_unpack("fp16", False))
_ASM_BF16_SCALED = tl.constexpr(_asm_unpack("bf16", True))
_ASM_FP16_SCALED = tl.constexpr(_asm_unpack("fp16", True))


@triton.jit
def _unpack_int4(b, dtype: tl.constexpr):
    """int8 [R, C] bytes -> (low nibbles, high nibbles) as `dtype` [R, C] each, values q = u - 8."""
    if dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(_ASM_BF16, "=r,=r,=r,=r,r", [b], dtype=(tl.bfloat16, tl.bfloat16),
                                         is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(_ASM_FP16, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                         is_pure=True, pack=4)


@triton.jit
def _unpack_int4_scaled(b, s_lo, s_hi, dtype: tl.constexpr):
    """As _unpack_int4, each half multiplied by its scales (`dtype`, broadcast against b)."""
    s_lo = tl.broadcast_to(s_lo, b.shape)
    s_hi = tl.broadcast_to(s_hi, b.shape)
    if dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(_ASM_BF16_SCALED, "=r,=r,=r,=r,r,r,r,r,r", [b, s_lo, s_hi],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(_ASM_FP16_SCALED, "=r,=r,=r,=r,r,r,r,r,r", [b, s_lo, s_hi],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _quant_matmul_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, stride_xm, stride_om, k_tiles, tiles_per_split, group_size,
    BITS: tl.constexpr, SCALE_PER_GROUP: tl.constexpr, EVEN_K: tl.constexpr, FAST_UNPACK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    grid_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % grid_m  # neighbouring programs share an N tile: its weight bytes come from L2 after the first
    pid_n = pid // grid_m
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm

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
            q = tl.load(w_ptr + k[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
            acc = tl.dot(a, q.to(a.dtype), acc)
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
            rows = t * HALF + offs_h
            b = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
            if SCALE_PER_GROUP:
                g_lo = (t * BLOCK_K) // group_size
                g_hi = (t * BLOCK_K + HALF) // group_size
                s_lo = tl.load(s_ptr + g_lo * N + offs_n, mask=mask_n, other=0.0)
                s_hi = tl.load(s_ptr + g_hi * N + offs_n, mask=mask_n, other=0.0)
                if FAST_UNPACK:
                    w_lo, w_hi = _unpack_int4_scaled(b, s_lo[None, :], s_hi[None, :], a_lo.dtype)
                else:
                    w_lo = ((b & 0xF) - 8).to(tl.float32).to(a_lo.dtype) * s_lo[None, :]
                    w_hi = (((b >> 4) & 0xF) - 8).to(tl.float32).to(a_lo.dtype) * s_hi[None, :]
            else:
                if FAST_UNPACK:
                    w_lo, w_hi = _unpack_int4(b, a_lo.dtype)
                else:
                    w_lo = ((b & 0xF) - 8).to(tl.float32).to(a_lo.dtype)
                    w_hi = (((b >> 4) & 0xF) - 8).to(tl.float32).to(a_lo.dtype)
            acc = tl.dot(a_lo, w_lo, acc)
            acc = tl.dot(a_hi, w_hi, acc)

    if not SCALE_PER_GROUP:  # one scale per output column: exact, in fp32, once
        scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc * scale[None, :]

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Serial reduction by the last split to finish: deterministic (partials added in split order).
        tile = offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial_ptr + pid_k * M * N + tile, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves (release below)
        counter = counter_ptr + pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(partial_ptr + s * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter, 0)  # ready for the next launch


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class QuantMatmul:
    """x [M, K] (bf16/fp16) @ dequantized weight [N, K].T -> [M, N] in x's dtype, on CUDA (see the module doc).

    Holds its own repacked copies of the weight (`qweight`, `scales`); the caller's tensors are only read, so the
    caller may drop them afterwards.
    """

    # Split K only for decode-sized M; aim for this many programs per SM, each with at least MIN_TILES K tiles.
    PROGRAMS_PER_SM = 2
    MIN_TILES_PER_SPLIT = 4
    MAX_SPLIT_K = 16

    def __init__(self, bits: int, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                 dtype: torch.dtype):
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"activations must be bfloat16 or float16, not {dtype}")
        self.bits, self.dtype = bits, dtype
        self.N = qweight.shape[0]
        self.K = qweight.shape[1] * (2 if bits == 4 else 1)
        device = qweight.device
        with torch.no_grad():
            if bits == 8:
                self.block_k = 128 if self.K > 64 else max(32, triton.next_power_of_2(self.K))
                self.k_pad = triton.cdiv(self.K, self.block_k) * self.block_k
                self.qweight = _pad_rows(qweight.t(), self.k_pad).contiguous()
                self.scales = scales.reshape(self.N).to(torch.float32).contiguous()
                self.scale_per_group = False
            else:
                groups = scales.shape[1] if scales.dim() == 2 else 1
                if self.K % groups or self.K // groups != group_size and groups > 1:
                    raise ValueError(f"{groups} scale groups do not split K={self.K} into groups of {group_size}")
                half = self._int4_half(self.K, group_size, groups)
                self.block_k = 2 * half
                self.k_pad = triton.cdiv(self.K, self.block_k) * self.block_k
                q = unpack_int4(qweight)  # [N, K] signed values
                if self.k_pad != self.K:
                    q = torch.cat([q, q.new_zeros(self.N, self.k_pad - self.K)], dim=1)
                q = q.view(self.N, self.k_pad // self.block_k, 2, half)
                packed = (q[:, :, 1] << 4) | (q[:, :, 0] & 0x0F)  # [N, tiles, half]: high nibble = upper half
                self.qweight = packed.to(torch.int8).reshape(self.N, self.k_pad // 2).t().contiguous()
                del q, packed
                self.scale_per_group = groups > 1
                if self.scale_per_group:
                    rows = triton.cdiv(self.k_pad, group_size)  # padded tiles read zero scales
                    self.scales = _pad_rows(scales.t().to(dtype), rows).contiguous()
                else:
                    self.scales = scales.reshape(self.N).to(torch.float32).contiguous()
            self.group_size = group_size if self.scale_per_group else self.k_pad
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 132)
        # Per-tile arrival counters for split-K (decode tiles: BLOCK_M = 16, one row of tiles). Zero; each
        # launch leaves them zero again.
        self._counters = torch.zeros(triton.cdiv(self.N, 64), dtype=torch.int32, device=device)
        self._configs: dict[int, tuple] = {}

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
        N, target = self.N, self.PROGRAMS_PER_SM * self.num_sms
        # int4: the K tile is fixed by the packing; int8: any power of two dividing the padding (128).
        bk = self.block_k
        if M <= 16:
            block_n = 128 if triton.cdiv(N, 128) >= target else 64
            tiles, k_tiles = triton.cdiv(N, block_n), self.k_pad // bk
            split = 1
            while (split * 2 <= self.MAX_SPLIT_K and tiles * split < target
                   and k_tiles // (split * 2) >= self.MIN_TILES_PER_SPLIT):
                split *= 2
            stages = 4 if self.bits == 4 or bk <= 64 else 3
            return 16, block_n, bk, split, 4, stages
        if M <= 32:
            return 32, 128, bk, 1, 4, 4
        if M <= 64:
            return 64, 128, bk, 1, 4, 4
        return 128, 128, bk if self.bits == 4 else min(bk, 64), 1, 8, 3

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        M, K = x.shape
        if K != self.K:
            raise ValueError(f"x has {K} columns, the weight {self.K}")
        if x.stride(1) != 1:
            x = x.contiguous()
        out = torch.empty(M, self.N, dtype=x.dtype, device=x.device)
        if M == 0:
            return out
        block_m, block_n, block_k, split, warps, stages = self.config(M)
        k_tiles = self.k_pad // block_k
        tiles_per_split = triton.cdiv(k_tiles, split)
        split = triton.cdiv(k_tiles, tiles_per_split)  # no empty splits
        partial = torch.empty(split, M, self.N, dtype=torch.float32, device=x.device) if split > 1 else out
        grid = (triton.cdiv(M, block_m) * triton.cdiv(self.N, block_n), split)
        _quant_matmul_kernel[grid](
            x, self.qweight, self.scales, out, partial, self._counters,
            M, self.N, K, x.stride(0), out.stride(0), k_tiles, tiles_per_split, self.group_size,
            BITS=self.bits, SCALE_PER_GROUP=self.scale_per_group, EVEN_K=K % block_k == 0,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
            num_warps=warps, num_stages=stages,
        )
        return out
