"""Weight-only quantization: int8 per output channel, int4 in groups along the input; glmkit's own are symmetric.

Portable layout (what is saved, and what ChatGLM's own int4/int8 checkpoints hold):
  int8: `qweight` int8 [out, in], `scales` [out]                  w = q * scale[row]
  int4: `qweight` int8 [out, in/2], two signed nibbles per byte, the even element in the high nibble;
        `scales` [out, in/group_size]                             w = q * scale[row, col // group_size]
        optional `offsets` [out, in/group_size] (asymmetric int4: AWQ, GPTQ; models/awq_gptq.py)
                                                                  w = q * scale[row, g] + offset[row, g]
        optional `perm` int64 [in] (GPTQ act-order): the layer computes x[..., perm] @ w.T, so that columns
        that share a group are contiguous
ChatGLM's official int4 checkpoint is this layout with one group per row (group_size = in). Symmetric layers have
no `offsets` (no buffer, nothing saved), so everything written before offsets existed loads unchanged.

At load time each QuantLinear packs its weight once for the device's kernel: PyTorch's `_weight_int8pack_mm` /
`_weight_int4pack_mm_for_cpu` on CPU, our Triton kernel (kernels/quant_matmul.py) on CUDA. Activations stay
in bf16/fp16 (W8A16, W4A16), except in int8a8 mode, where the int8 linears quantize their inputs per token (W8A8):
on an x86 CPU with AVX2 through models/cpu_int8.py, on CUDA through kernels/int8_matmul.py (int8 tensor cores;
qkv's rows in two 8-bit halves, `int8_activations`). Nothing is compiled at run time. Offsets cost no kernel of
their own: the CPU kernel computes (u - 8) * scale + zero per group and takes them as its zeros; on CUDA the
Triton kernel computes the symmetric part and QuantLinear adds sum(x over each group) @ offsets.T.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidParameterError, ModelLoadError

MODES = {"int8": 8, "int4": 4, "int8a8": 8}  # int8a8: the int8 weights, int8 activations on a CPU (cpu_int8.py)
DEFAULT_GROUP_SIZE = 32  # as llama.cpp's 4-bit blocks; `glmkit quantize --group-size` trades quality for speed
HEAD_BITS = 8  # the output layer stays int8 in int4 mode too: its error shows directly in every logit
# Linears that int4 mode keeps in int8: the query/key/value projection is 7% of a layer's weights but carries the
# largest share of int4's error (the default model's perplexity: +8.6% all int4, +5.1% with it in int8;
# benchmarks/perplexity.py). As llama.cpp's Q4_K_M keeps attention values at higher precision.
INT4_INT8_LAYERS = ("attn.qkv",)
_CPU_INT4_GROUPS = (256, 128, 64, 32)  # group sizes PyTorch's CPU int4 kernel accepts
# Linears that are quantized; embeddings, norms and biases stay in float.
QUANTIZED = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down", "lm_head")
# int8a8 on CUDA: linears whose inputs go in as two 8-bit halves (about 16 bits). qkv is the most sensitive to
# rounded inputs (README, "Quantization"), as on the CPU (cpu_int8.REFINED).
REFINED_INPUTS = ("attn.qkv",)


@dataclass
class QuantPlan:
    """How a checkpoint's linears are quantized, and where the quantized weights come from."""
    bits: int
    group_size: int | None = DEFAULT_GROUP_SIZE  # int4 only; None: one group per row (ChatGLM's own checkpoints)
    head_bits: int | None = HEAD_BITS            # None: the output layer stays in float
    source: str = "fresh"  # fresh: quantize float weights while loading; glmkit: saved by us; chatglm: official;
    #                        awq / gptq: 4-bit checkpoints of AutoAWQ / AutoGPTQ, converted while loading
    int8_layers: tuple[str, ...] = ()            # int4 mode: linears (name suffixes) kept in int8
    checkpoint_format: str | None = None         # awq: "gemm"; gptq: "gptq" (v1: zeros stored minus one), "gptq_v2"
    int8_activations: bool = False               # int8a8: the int8 linears quantize their inputs too

    @classmethod
    def fresh(cls, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> QuantPlan:
        """What --quantization int8/int4 does to a float checkpoint."""
        return cls(bits, group_size, int8_layers=INT4_INT8_LAYERS if bits == 4 else ())

    def with_activations(self, requested: str | None) -> QuantPlan:
        """This plan, running int8 activations if `requested` is int8a8 (the weights are the same)."""
        return replace(self, int8_activations=True) if requested == "int8a8" else self

    def bits_for(self, name: str) -> int | None:
        """Bits of the linear `name` (module name, with or without `.weight`)."""
        name = name.removesuffix(".weight")
        if name.startswith("lm_head"):
            return self.head_bits
        return 8 if self.bits == 4 and name.endswith(self.int8_layers) else self.bits

    @property
    def mode(self) -> str:
        return "int8a8" if self.int8_activations else f"int{self.bits}"

    @property
    def tag(self) -> str:
        """Names the weights this plan makes, e.g. int4-g32-qkv8 (a cache key; int8a8 shares int8's weights)."""
        kept = "".join(f"-{name.rpartition('.')[2]}8" for name in self.int8_layers)
        return f"int{self.bits}-g{self.group_size}{kept}"

    def to_config(self) -> dict:
        return {"quant_method": "glmkit", "bits": self.bits, "group_size": self.group_size,
                "head_bits": self.head_bits, "int8_layers": list(self.int8_layers)}


def bits_of(mode: str | None) -> int | None:
    if mode is None or mode == "none":
        return None
    if mode not in MODES:
        raise InvalidParameterError("quantization", mode, "must be int8, int8a8, int4 or none")
    return MODES[mode]


def plan_for(raw_config: dict, requested: str | None) -> QuantPlan | None:
    """The plan for loading a checkpoint: what it already holds, or what the user asked for."""
    bits = bits_of(requested)
    stored = None
    qc = raw_config.get("quantization_config")
    if qc:
        method = qc.get("quant_method")
        if method in ("awq", "gptq"):
            stored = _awq_gptq_plan(qc)
            if bits is not None:  # the checkpoint's own 4-bit format is what runs; nothing is quantized again
                raise InvalidParameterError("quantization", requested, f"the checkpoint is already quantized "
                                            f"({method}, 4-bit); omit --quantization or load the float checkpoint")
            return stored
        if method != "glmkit":
            raise ModelLoadError(f"config.json: quantization_config.quant_method={method!r} is not supported "
                                 "(supported: glmkit, awq, gptq); load the float checkpoint and pass --quantization "
                                 "int8 or int4")
        stored = QuantPlan(qc["bits"], qc.get("group_size"), qc.get("head_bits"), source="glmkit",
                           int8_layers=tuple(qc.get("int8_layers", ())))
    elif raw_config.get("quantization_bit") in (4, 8):  # ChatGLM's -int4 / -int8 releases
        stored = QuantPlan(raw_config["quantization_bit"], None, None, source="chatglm")
    if stored is None:
        return QuantPlan.fresh(bits).with_activations(requested) if bits else None
    if bits is not None and bits != stored.bits:
        raise InvalidParameterError("quantization", requested, f"the checkpoint is already quantized to "
                                    f"{stored.mode}; omit --quantization or load the float checkpoint")
    return stored.with_activations(requested)


_GPTQ_FORMATS = ("gptq", "gptq_v2")


def _awq_gptq_plan(qc: dict) -> QuantPlan:
    """The plan for an AWQ/GPTQ checkpoint's `quantization_config` (models/awq_gptq.py reads its tensors), or a
    clear refusal of what glmkit cannot run."""
    method = qc["quant_method"]

    def refuse(field: str, value, why: str) -> ModelLoadError:
        return ModelLoadError(f"config.json: quantization_config.{field}={value!r} (quant_method {method!r}): {why}")

    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise refuse("bits", bits, f"glmkit runs 4-bit {method.upper()} checkpoints only (its int4 kernels); use "
                     "the model's 4-bit release, or its float checkpoint with --quantization int8 or int4")
    group_size = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(group_size, int) or (group_size != -1 and group_size < 16):
        raise refuse("group_size", group_size, "must be -1 (one group per row) or a group size of at least 16")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise refuse("version", qc.get("version"), "glmkit reads AutoAWQ's \"gemm\" layout only; use the "
                         "model's gemm release (the usual one), or its float checkpoint with --quantization int4")
        fmt = "gemm"
    else:
        fmt = qc.get("checkpoint_format", qc.get("format")) or "gptq"
        if fmt not in _GPTQ_FORMATS:
            raise refuse("checkpoint_format", fmt, "glmkit reads the gptq (v1) and gptq_v2 layouts only; use a "
                         "release in the plain GPTQ format, or the float checkpoint with --quantization int4")
    return QuantPlan(4, None if group_size == -1 else group_size, 4 if qc.get("lm_head") else None, source=method,
                     checkpoint_format=fmt)


def is_quantized_weight(name: str) -> bool:
    """True for the weight of a linear layer that quantization replaces."""
    return name.endswith(".weight") and name.removesuffix(".weight").endswith(QUANTIZED)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-10)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    out_features, in_features = weight.shape
    if in_features % group_size or in_features % 2:
        raise InvalidParameterError("group_size", group_size, f"must divide the layer's input size {in_features}")
    w = weight.float().view(out_features, in_features // group_size, group_size)
    peak = w.abs().amax(dim=2).clamp_min(1e-10)
    # With 16 levels the max-abs scale is rarely the best one: per group, keep the candidate scale with the
    # smallest squared error (clipping the largest weights a little buys finer steps for all the others).
    best_scales, best_err = None, None
    for levels in (7.0, 7.5, 8.0, 8.5, 9.0):
        scales = peak / levels
        err = (torch.round(w / scales[..., None]).clamp_(-8, 7) * scales[..., None] - w).pow_(2).sum(dim=2)
        if best_err is None:
            best_scales, best_err = scales, err
        else:
            better = err < best_err
            best_scales, best_err = torch.where(better, scales, best_scales), torch.minimum(err, best_err)
    q = torch.round(w / best_scales[..., None]).clamp_(-8, 7).to(torch.int8).view(out_features, in_features)
    return pack_int4(q), best_scales


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> [out, in/2], element 2k in the high nibble."""
    return ((q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] int8 -> signed values [out, in] (arithmetic shifts keep the sign)."""
    high = packed >> 4
    low = (packed << 4) >> 4
    return torch.stack([high, low], dim=-1).flatten(-2)


def dequantize(bits: int, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
               offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The portable layout back to a [out, in] weight in `dtype` (computed in it: no fp32 copy on the way). A
    layer with a `perm` gets its columns in that permuted order (what x[..., perm] multiplies)."""
    if bits == 8:
        return qweight.to(dtype) * scales.to(dtype)[:, None]
    q = unpack_int4(qweight).to(dtype)
    out_features, in_features = q.shape
    groups = scales.shape[1]
    w = q.view(out_features, groups, in_features // groups) * scales.to(dtype)[..., None]
    if offsets is not None:
        w += offsets.to(dtype)[..., None]
    return w.view(q.shape)


def quantize(bits: int, weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE):
    return quantize_int8(weight) if bits == 8 else quantize_int4(weight, group_size)


class _DequantizedLinear(torch.autograd.Function):
    """y = x @ W.T (+ bias) with W rebuilt from a QuantLinear's portable layout in the forward pass and again in
    the backward pass, so it is never kept in between: training on a quantized base (LoRA on int8/int4) holds one
    layer's float weight at a time. The frozen weight gets no gradient; the input does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "QuantLinear") -> torch.Tensor:
        ctx.module = module
        weight = dequantize(module.bits, module.qweight, module.scales, x.dtype, module.offsets)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        m = ctx.module
        return grad @ dequantize(m.bits, m.qweight, m.scales, grad.dtype, m.offsets), None


class QuantLinear(nn.Module):
    """A linear layer with a weight-only quantized weight; `prepare()` packs it for the device's kernel.

    `offsets`: an asymmetric int4 layer (buffer `offsets` [out, groups]); `permuted`: a GPTQ act-order layer
    (buffer `perm` [in]: the input columns in the order of the weight's columns). Without them neither buffer
    exists (both attributes are None), so symmetric layers hold and save exactly what they always did."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 offsets: bool = False, permuted: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else in_features
        cols = in_features if bits == 8 else in_features // 2
        self.register_buffer("qweight", torch.empty(out_features, cols, dtype=torch.int8))
        scale_shape = (out_features,) if bits == 8 else (out_features, in_features // self.group_size)
        self.register_buffer("scales", torch.empty(scale_shape))
        assert bits == 4 or not offsets, "offsets are an int4 feature"
        self.asymmetric = offsets
        self.register_buffer("offsets", torch.empty(scale_shape) if offsets else None)
        self.register_buffer("perm", torch.empty(in_features, dtype=torch.long) if permuted else None)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._forward = None
        self._bias_in_forward = False  # the kernel adds the bias itself (CUDA, symmetric)
        self.int8_activations = 0  # CUDA int8a8 (set before prepare): inputs quantized to int8, 1 or 2 halves

    def extra_repr(self) -> str:
        extras = (", offsets" if self.asymmetric else "") + (", act-order" if self.perm is not None else "")
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, group_size={self.group_size}{extras}"

    def prepare(self, dtype: torch.dtype) -> None:
        """Pack the weight for this device's kernel (once, after the move to the device)."""
        if dtype not in (torch.bfloat16, torch.float16):
            raise InvalidParameterError("dtype", str(dtype).removeprefix("torch."),
                                        "quantized weights run with bfloat16 or float16 activations; "
                                        "use --dtype bfloat16 (or leave it auto)")
        if self.bias is not None:
            self.bias.data = self.bias.data.to(dtype)
        if self.qweight.device.type == "cuda":
            self._forward = self._triton(dtype)
        elif self.bits == 8:
            # A fresh allocation: the kernel's vector loads crash on tensors at odd offsets inside a file mapping.
            self.qweight = self.qweight.clone(memory_format=torch.contiguous_format)
            self.scales = self.scales.to(dtype)
            self._forward = lambda x: torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        else:
            self._forward = self._cpu_int4(dtype)
        self.qweight.requires_grad_(False)

    def _triton(self, dtype: torch.dtype):
        """The CUDA forward: our Triton kernel for q * scale, plus the offsets' share in torch (fp32 accumulation,
        fixed shapes and no host syncs, so it captures in a CUDA graph). `self.offsets` stays a plain fp32 buffer
        [out, groups] on the device, for a kernel that folds it in later. (Under Triton's interpreter this runs
        on CPU tensors too: the tests call it directly.)"""
        from ..kernels.quant_matmul import QuantMatmul

        symmetric = self.offsets is None
        mm = QuantMatmul(self.bits, self.qweight, self.scales, self.group_size, dtype,
                         bias=self.bias if symmetric else None, int8_activations=self.int8_activations)
        self.qweight, self.scales = mm.qweight, mm.scales  # the kernel's layout replaces ours (no 2nd copy)
        if symmetric:
            self._bias_in_forward = self.bias is not None
            return mm
        self.offsets = self.offsets.float().contiguous()
        offsets, groups, size = self.offsets, self.offsets.shape[1], self.group_size

        def forward(x: torch.Tensor) -> torch.Tensor:
            sums = x.reshape(x.shape[0], groups, size).sum(-1, dtype=torch.float32)  # [M, groups]
            return torch.addmm(mm(x).float(), sums, offsets.t()).to(x.dtype)
        return forward

    def _cpu_int4(self, dtype: torch.dtype):
        group = self.group_size
        scales = self.scales
        offsets = torch.zeros_like(scales) if self.offsets is None else self.offsets.float()
        if group not in _CPU_INT4_GROUPS:  # e.g. ChatGLM's one group per row: repeat the scale per kernel group
            group = next((g for g in _CPU_INT4_GROUPS if self.group_size % g == 0 and self.in_features % g == 0), None)
            if group is None:
                raise InvalidParameterError("group_size", self.group_size, "must be a multiple of 32 for the CPU "
                                            "int4 kernel; run this checkpoint on a GPU, or load its float "
                                            "checkpoint with --quantization int4")
            # An offset times the sum of x over its group is the sum of its shares over the group's parts.
            scales = scales.repeat_interleave(self.group_size // group, dim=1)
            offsets = offsets.repeat_interleave(self.group_size // group, dim=1)
        unsigned = unpack_int4(self.qweight).to(torch.int32) + 8
        pad = -self.out_features % 16  # the kernel wants whole tiles of 16 output rows: zero rows fill up
        if pad:
            unsigned = F.pad(unsigned, (0, 0, 0, pad), value=8)
            scales = F.pad(scales, (0, 0, 0, pad))
            offsets = F.pad(offsets, (0, 0, 0, pad))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), 1)
        # The kernel computes (q + 8 - 8) * scale + zero per group; [groups, out, 2] holds (scale, zero = offset).
        scales_zeros = torch.stack([scales.t(), offsets.t()], dim=-1).to(dtype).contiguous()
        del self.qweight  # the packed copy replaces it
        self.register_buffer("qweight", packed)
        self.scales = scales_zeros
        self.offsets = None  # folded into scales_zeros
        n = self.out_features
        if pad:
            return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)[:, :n]
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:  # act-order: the weight's columns are x's columns in this order
            x = x.index_select(-1, self.perm)
        if self._forward is None:  # not packed for a kernel (loaded for training): dequantize as it goes
            return _DequantizedLinear.apply(x, self)
        shape = x.shape
        y = self._forward(x.reshape(-1, self.in_features)).view(*shape[:-1], self.out_features)
        return y if self.bias is None or self._bias_in_forward else y + self.bias


def replace_linears(model: nn.Module, plan: QuantPlan, state: dict | None = None) -> None:
    """Swap the quantized linears of a (meta) DecoderModel for QuantLinear shells of the same shape. `state` (the
    tensors about to be loaded) says which layers have offsets or a permutation, and which a checkpoint left in
    float (a plain `weight`: AWQ's modules_to_not_convert)."""
    state = state or {}
    for name, module in list(model.named_modules()):
        bits = plan.bits_for(name)
        if isinstance(module, nn.Linear) and name.endswith(QUANTIZED) and bits and name + ".weight" not in state:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            group = (plan.group_size or module.in_features) if bits == 4 else module.in_features
            setattr(parent, child, QuantLinear(module.in_features, module.out_features, module.bias is not None,
                                               bits, group, offsets=name + ".offsets" in state,
                                               permuted=name + ".perm" in state))


def prepare_model(model: nn.Module, dtype: torch.dtype, int8_activations: bool = False) -> None:
    """Pack every QuantLinear for its device. `int8_activations` (int8a8 on CUDA): the int8 linears quantize
    their inputs per row on the GPU's int8 tensor cores, those named in REFINED_INPUTS in two 8-bit halves
    (kernels/int8_matmul.py; the CPU's int8a8 is models/cpu_int8.py, switched on after packing)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            if int8_activations and module.bits == 8 and module.qweight.device.type == "cuda":
                module.int8_activations = 2 if name.endswith(REFINED_INPUTS) else 1
            module.prepare(dtype)
