"""CPU int8 products with int8 activations (W8A8): the weights of glmkit's int8 layout (`qweight` int8 [out, in],
`scales` [out], w = q * scale[row]) multiplied byte by byte with activations quantized per call. Knows nothing of
models, plans or the engine: `DynamicInt8Linear` is a callable that QuantLinear can use as its CPU forward.

Why: PyTorch's `_weight_int8pack_mm` (bf16 activations, W8A16) converts every weight byte to float before its
multiply-add and is compute-bound on a CPU (6-7 GB/s of weights per core on an AVX512-BF16 EPYC), where a byte x
byte product reads the weights at the memory's pace and stays nearly as fast for 8 rows (8 concurrent streams) as
for one (README, "Quantization").

Two kernels, the same arithmetic contract:
- glmkit's own (`kernels/cpu_int8.c`, compiled when the package is installed): each row of x is quantized to 8
  bits centred on its own range (x ~= mid + step * a, a in [-127, 127]) and the whole linear (quantization,
  product, scales) is one call. Its integer sums run on the widest instruction set the CPU has (`isa`): AVX2
  (`vpmaddubsw` on |q| and a with q's sign, which cannot saturate, so 8-bit activations on every AVX2 CPU),
  AVX-VNNI or AVX512-VNNI (`vpdpbusd`); all three give the same sums, so the same answer. The default wherever it
  was built and the CPU has AVX2.
- fbgemm's dynamic quantized linear (PyTorch's), where ours was not built: it quantizes the whole input with one
  (scale, zero point), so each row is first mapped onto [0, 1] exactly (x = low + span * x', both per row) and
  the product rebuilt as span * (x' @ W.T) + low * (W @ 1). CPUs without VNNI multiply bytes there with
  `vpmaddubsw` on unsigned activations, which saturates int16 pair sums unless they keep to 7 bits
  (`reduce_range`; +2.6% perplexity on the default model, 8 bits +5.1%): so each product runs in two 7-bit passes
  of one fbgemm call (the rounding, and its error mapped onto [0, 1] and rounded in its turn), 14 bits in effect.

Both quantize each row on its own range: one scale for a whole prompt would let one token's outliers (the first
token's, in Qwen models) coarsen every other token's steps (perplexity +11% instead of +1.7% for all linears),
and a row is then quantized the same way alone, beside other requests' rows, or after a cached prefix, so an
answer does not depend on what ran beside it. The qkv projection is the most sensitive (REFINED and
KEEP_BF16_ACTIVATIONS say why): on glmkit's kernel its rows go in as two 8-bit halves, on fbgemm at bf16.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch

from ..errors import InvalidParameterError
from .cpu_features import cpu_flags

try:  # glmkit's own kernel, built at install time (setup.py); absent where it could not be built
    from ..kernels import _cpu_int8
except ImportError:
    _cpu_int8 = None

log = logging.getLogger("glmkit")
KERNELS = ("glmkit", "fbgemm")
ISAS = ("avx2", "avx-vnni", "avx512-vnni")  # glmkit's kernel's instruction sets, narrowest first (its isa index)

# The overload itself: calling the packet (torch.ops.quantized.linear_dynamic) first scans the arguments in Python
# for fake script objects, about 2 us per call, 73 calls per decode step.
_linear_dynamic = torch.ops.quantized.linear_dynamic.default


def fbgemm_available() -> bool:
    """Whether this PyTorch has fbgemm's dynamic quantized linear (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def own_kernel_available() -> bool:
    """Whether glmkit's own kernel was built with this install and the CPU runs it (AVX2 at least)."""
    return _cpu_int8 is not None and bool(_cpu_int8.isas())


def own_kernel_isas() -> list[str]:
    """The instruction sets glmkit's kernel runs on here, in ISAS' order (none where it was not built)."""
    return _cpu_int8.isas() if _cpu_int8 is not None else []


def default_isa() -> str:
    """The instruction set glmkit's kernel runs on: the widest this CPU has; GLMKIT_INT8_ISA chooses (benchmarks
    compare)."""
    here = own_kernel_isas()
    chosen = os.environ.get("GLMKIT_INT8_ISA", "").strip()
    if not chosen:
        return here[-1]
    if chosen not in here:
        raise InvalidParameterError("GLMKIT_INT8_ISA", chosen, f"this CPU runs glmkit's kernel on {', '.join(here)}")
    return chosen


def default_kernel() -> str:
    """glmkit's where it runs, else fbgemm; GLMKIT_INT8_KERNEL=fbgemm (or glmkit) chooses (benchmarks compare)."""
    chosen = os.environ.get("GLMKIT_INT8_KERNEL", "").strip()
    if not chosen:
        return "glmkit" if own_kernel_available() else "fbgemm"
    if chosen not in KERNELS or (chosen == "glmkit" and not own_kernel_available()):
        raise InvalidParameterError("GLMKIT_INT8_KERNEL", chosen, f"must be one of {', '.join(KERNELS)} and run "
                                    "here (glmkit's kernel: " + ("built" if _cpu_int8 is not None else
                                                                  "not built with this install") + ")")
    return chosen


@contextlib.contextmanager
def using_kernel(kernel: str | None, isa: str | None = None):
    """Within the block, models loaded run int8a8 on `kernel` (GLMKIT_INT8_KERNEL) and, on glmkit's, on `isa`
    (GLMKIT_INT8_ISA); None: the default."""
    names = {"GLMKIT_INT8_KERNEL": kernel, "GLMKIT_INT8_ISA": isa}
    before = {name: os.environ.get(name) for name in names}
    os.environ.update({name: value for name, value in names.items() if value})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_said: set[tuple[str, str | None]] = set()


def _say_kernel(kernel: str, isa: str | None) -> None:
    """One log line per process naming the kernel int8 activations run on (and why, for the fallback)."""
    if (kernel, isa) in _said:
        return
    _said.add((kernel, isa))
    if kernel == "glmkit":
        log.info("glmkit: int8 activations run on glmkit's own kernel (%s, 8-bit, one pass)", isa)
    else:
        why = ("was not built with this install (no C compiler or OpenMP then); reinstall with gcc present to "
               "build it" if _cpu_int8 is None else "needs AVX2, which this CPU lacks")
        bits = "8-bit" if cpu_has_vnni() else "two 7-bit passes"
        log.info("glmkit: int8 activations run on fbgemm (%s): glmkit's own kernel %s", bits, why)


def _row_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, span) of each row of x, [M, 1] each; span at least the smallest float, so a constant row maps to 0.
    (aminmax along a dimension is several times slower than over a whole tensor or than amin and amax apart.)"""
    if x.shape[0] == 1:
        low, high = (t.view(1, 1) for t in torch.aminmax(x))
    else:
        low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    return low, (high - low).clamp_min_(torch.finfo(torch.float32).tiny)


def cpu_has_vnni() -> bool:
    """AVX512-VNNI or AVX-VNNI: byte products accumulate straight into int32. Without it fbgemm sums pairs of
    byte products in int16 first, which saturates unless activations keep to 7 bits (reduce_range)."""
    flags = cpu_flags()
    return "avx512_vnni" in flags or "avx_vnni" in flags


class DynamicInt8Linear:
    """y = x @ W.T (no bias) with W = qweight * scales[:, None], W8A8 on `kernel` ("glmkit" or "fbgemm"; default:
    glmkit's where it runs). x: [M, in] any float dtype; y: [M, out] in x's dtype (`out_dtype` to override: fp32
    logits need no bf16 round trip). `refine` (glmkit's only): each row quantized in two 8-bit halves, the rounding
    and the error left, about 16-bit activations for the price of one more row. `reduce_range` (fbgemm only):
    7-bit activations in two passes."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype | None = None,
                 reduce_range: bool | None = None, input_scales: torch.Tensor | None = None,
                 kernel: str | None = None, refine: bool = False, isa: str | None = None):
        self.kernel = kernel or default_kernel()
        if refine and self.kernel != "glmkit":
            raise ValueError("refine=True: two 8-bit halves per row are glmkit's kernel's; fbgemm's product is "
                             "one pass (or two 7-bit ones, reduce_range)")
        self.refine = refine
        if self.kernel not in KERNELS or (self.kernel == "glmkit" and not own_kernel_available()):
            raise ValueError(f"kernel={self.kernel!r}: must be one of {KERNELS} and run here (glmkit's: "
                             f"{'built' if _cpu_int8 is not None else 'not built'})")
        out_features, in_features = qweight.shape
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, out_dtype
        # [in]: the weight's columns were multiplied by these (see `smoothed`), so the input is divided by them
        self.inverse_input_scales = None if input_scales is None else input_scales.float().reciprocal()
        # [out] W @ 1, exact from the int8 rows (what a row's low end, or its mid, contributes to the product)
        self.row_sums = (qweight.to(torch.int64).sum(dim=1).double() * scales.detach().double()).float()
        self.isa = None
        if self.kernel == "glmkit":
            self.isa = isa or default_isa()
            if self.isa not in own_kernel_isas():
                raise ValueError(f"isa={self.isa!r}: glmkit's kernel runs on {own_kernel_isas()} here")
            self.isa_index = ISAS.index(self.isa)  # the extension's `isa` argument
            # The kernel's layout: rows padded to a multiple of 4 and columns to 64 with zeros (no loop tails)
            self.k_pad = -(-in_features // 64) * 64
            self.weight = torch.zeros(-(-out_features // 4) * 4, self.k_pad, dtype=torch.int8)
            self.weight[:out_features, :in_features] = qweight
            self.qsums = self.weight.sum(dim=1, dtype=torch.int32)  # the VNNI sets' correction for a + 128
            self.scales = scales.detach().float().contiguous()
            self.reduce_range = False
        else:
            self._pack_fbgemm(qweight, scales)
            self.reduce_range = not cpu_has_vnni() if reduce_range is None else reduce_range
        _say_kernel(self.kernel, self.isa)

    def _pack_fbgemm(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        # The process-wide quantized engine: "x86" (PyTorch's default here) packs linears for fbgemm too, at the
        # same speed (measured); naming fbgemm keeps a process that chose qnnpack or onednn from packing for those.
        if torch.backends.quantized.engine != "fbgemm" and "fbgemm" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():  # "quantized tensor creation functions are deprecated": the op's only input
            warnings.simplefilter("ignore", UserWarning)
            weight = torch._make_per_channel_quantized_tensor(
                qweight.to(torch.int8).contiguous(), scales.detach().to(torch.float64).contiguous(),
                torch.zeros(qweight.shape[0], dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(weight, None)  # fbgemm's own layout: a copy of the bytes

    @classmethod
    def smoothed(cls, qweight: torch.Tensor, scales: torch.Tensor, input_scales: torch.Tensor,
                 **kwargs) -> "DynamicInt8Linear":
        """The same product with each input column j divided by input_scales[j] before the activations are
        quantized, and the weight's column multiplied by it (re-quantized to int8 per row): channels that are
        always large (e.g. where the preceding RMSNorm's weight is large) stop coarsening the others' steps."""
        from .quant import dequantize, quantize_int8

        weight = dequantize(8, qweight, scales.float()) * input_scales.float()[None, :]
        return cls(*quantize_int8(weight), input_scales=input_scales, **kwargs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.out_dtype or x.dtype
        if self.inverse_input_scales is not None:
            x = x.float() * self.inverse_input_scales
        if self.kernel == "glmkit":
            return self._own(x, dtype)
        x = x.float()
        # Per-row ranges: each row is mapped onto [0, 1] exactly (x = low + span * x'), so fbgemm's one range for
        # the whole input is [0, 1] whatever the batch holds. The product comes back as span * (x' @ W.T) +
        # low * (W @ 1).
        low, span = _row_range(x)
        x = (x - low).div_(span)
        y = self._two_pass(x) if self.reduce_range else _linear_dynamic(x, self.packed, False)
        y = torch.addcmul(low * self.row_sums, y, span)
        return y if y.dtype == dtype else y.to(dtype)

    def _own(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        x = x.contiguous()
        out_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        y = torch.empty(x.shape[0], self.out_features, dtype=out_dtype)
        _cpu_int8.linear(x.data_ptr(), x.dtype == torch.bfloat16, x.shape[0], self.in_features, self.weight.data_ptr(),
                         self.k_pad, self.out_features, self.scales.data_ptr(), self.row_sums.data_ptr(),
                         self.qsums.data_ptr(), y.data_ptr(), out_dtype == torch.bfloat16, torch.get_num_threads(),
                         self.refine, self.isa_index)
        return y if y.dtype == dtype else y.to(dtype)

    def _two_pass(self, x: torch.Tensor) -> torch.Tensor:
        """x' @ W.T for rows on [0, 1] with 7-bit activations, as a + e: a = x' rounded to 7 bits (fed as exactly
        the values fbgemm's 1/127 steps give, so it reproduces them), e = x' - a mapped onto [0, 1] per row and
        rounded in its turn. One call on both halves: the weights are read once."""
        coarse = x.mul(127).round_().div_(127)
        rest = x.sub_(coarse)
        rest_low, rest_span = _row_range(rest)
        both = _linear_dynamic(torch.cat([coarse, rest.sub_(rest_low).div_(rest_span)]), self.packed, True)
        y, y_rest = both.split(x.shape[0])
        return y.addcmul_(y_rest, rest_span).addcmul_(rest_low, self.row_sums)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight int8 [out, in], scales fp32 [out]) back from the packed layout (tests, exports)."""
        if self.kernel == "glmkit":
            return self.weight[:self.out_features, :self.in_features].clone(), self.scales.clone()
        weight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return weight.int_repr(), weight.q_per_channel_scales().float()


# Measured on the default model (benchmarks/perplexity.py, vs fp32; int8 with bf16 activations: +0.24%): every
# linear W8A8 on fbgemm +1.72%, the qkv projection alone +1.07% of that; on glmkit's kernel +1.17% (an AVX2
# EPYC). So qkv runs refined there (each row in two 8-bit halves, one pass over the weights): +0.86% on that
# EPYC (qkv at bf16 activations: +0.54%, but 1/1.2 of the decode speed, as torch's bf16-activation product is
# compute-bound on such a CPU), +0.54% on an AVX512 EPYC (the same on each instruction set: the sums are the
# same). On fbgemm qkv keeps bf16 activations: +0.46% (+0.76% when switched before QuantLinear.prepare rounds
# the scales to bf16: the text's 1,761 tokens move by that much between near-identical weights). Smoothing qkv
# and gate_up by their norm's weight measured +0.59% with bf16-rounded scales but +1.55% with fp32 ones (+1.74%
# unsmoothed): no gain beyond that noise, so it is not the default. qkv through fbgemm in two 7-bit passes (as on
# CPUs without VNNI) rather than bf16 activations: +1.20%.
REFINED = ("attn.qkv",)  # glmkit's kernel: 16-bit activations in two 8-bit halves
KEEP_BF16_ACTIVATIONS = ("attn.qkv",)  # fbgemm: torch's product with bf16 activations
SMOOTHED: tuple[str, ...] = ()
# The RMSNorm whose output each smoothable linear takes (DecoderLayer's names)
_NORM_BEFORE = {"attn.qkv": "attn_norm", "mlp.gate_up": "mlp_norm"}


def runs_here() -> bool:
    """Whether int8a8 can run on this machine: a CPU with AVX2, and glmkit's kernel built or PyTorch's fbgemm."""
    return own_kernel_available() or (fbgemm_available() and "avx2" in cpu_flags())


def use_int8_activations(model: torch.nn.Module, dtype: torch.dtype | None = None,
                         keep: tuple[str, ...] | None = None, smooth: tuple[str, ...] = SMOOTHED,
                         refine: tuple[str, ...] = REFINED, kernel: str | None = None) -> int:
    """Switch the CPU int8 QuantLinears of a loaded model (but those named `keep`) to W8A8 on `kernel` (default:
    glmkit's where it runs), before or after QuantLinear.prepare (before is better: the scales are still fp32;
    then pass the activations' `dtype`, which the bias takes as prepare would give it). The kernel's copy of the
    weight replaces `qweight`. `keep` defaults to nothing on glmkit's kernel, where those named `refine` quantize
    each row in two halves, and to KEEP_BF16_ACTIVATIONS on fbgemm. Those named `smooth` (`attn.qkv`,
    `mlp.gate_up`: the ones right after an RMSNorm) divide their input by the magnitude of that norm's weight
    first (DynamicInt8Linear.smoothed); the module's input and output stay what they were (a LoRA beside it sees
    the same x). Returns how many were switched."""
    from .quant import QuantLinear

    kernel = kernel or default_kernel()
    if keep is None:
        keep = () if kernel == "glmkit" else KEEP_BF16_ACTIVATIONS
    switched = 0
    for name, module in model.named_modules():
        if (not isinstance(module, QuantLinear) or module.bits != 8 or module.qweight.device.type != "cpu"
                or name.endswith(keep) or isinstance(module._forward, DynamicInt8Linear)):
            continue
        options = dict(kernel=kernel, refine=kernel == "glmkit" and bool(refine) and name.endswith(refine),
                       out_dtype=torch.float32 if name.endswith("lm_head") else None)  # logits are wanted in fp32
        norm_name = next((name.removesuffix(linear) + norm for linear, norm in _NORM_BEFORE.items()
                          if name.endswith(linear)), None)
        if name.endswith(smooth) and norm_name is not None:
            norm = model.get_submodule(norm_name).weight.detach()
            input_scales = norm.float().abs().clamp_min(1e-6)
            module._forward = DynamicInt8Linear.smoothed(module.qweight, module.scales, input_scales, **options)
        else:
            module._forward = DynamicInt8Linear(module.qweight, module.scales.float(), **options)
        module.qweight = torch.empty(0, dtype=torch.int8)
        if dtype is not None and module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
        switched += 1
    return switched
