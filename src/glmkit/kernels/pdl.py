"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's kernels.

A batch-1 decode step is a chain of about 300 short kernels, each depending on the one before. Normally a
kernel's first program starts only once the previous kernel has finished entirely, so every launch pays the
previous kernel's last, half-empty wave and its own ramp-up: a few microseconds each, which is most of what keeps
a 5-30 us GEMV from the memory's pace. With PDL (`launch_pdl=True`) the next kernel's programs are placed on the
SMs as the previous kernel's programs retire, and run up to `gdc_wait()`, which returns once the previous kernel
has finished and its writes are visible.

The rule every kernel launched this way keeps (`PDL` constexpr on):
  * `gdc_launch_dependents()` first (lets the next kernel be placed once all of this one's programs run);
  * before `gdc_wait()`, nothing but loads of weights (never written while a model serves) and index math;
    every activation, cache or scratch read and every store comes after it, in every program.
Because each kernel's completion then implies its predecessor's, anything launched later, PDL or not, sees all
earlier writes, as in plain stream order. Kernels launched without PDL (PyTorch's) are ordinary stream
serialization points.

Where it is used: inside `scope(True)`, which the decode graphs of a model with quantized weights are captured
in (engine/cuda_graphs.py). On an H200 (ChatGLM3-6B shape, one graph replay of a batch-1 step, PDL off -> on,
in one lease): int4 1.978 -> 1.868 ms, int8 2.280 -> 2.254, but bf16 3.351 -> 3.444, slower; with PDL on the
GEMVs alone or on the small kernels alone int4 was slower too (2.058 / 2.000 ms): the chain gains only when
every link in it launches early. `GLMKIT_PDL=1` turns it on everywhere, `0` off everywhere, and
`GLMKIT_PDL=name,name` on for those kernels alone (A/B runs). It is always off without a GPU of compute
capability 9 or later, under Triton's interpreter, and with a Triton that lacks it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os

import torch

try:
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401  (used by the kernels)
    _SUPPORTED = "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}
except ImportError:  # an older Triton: the kernels' PDL branches are never compiled
    gdc_launch_dependents = gdc_wait = None
    _SUPPORTED = False
_SUPPORTED = _SUPPORTED and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")  # set before triton's import


_SCOPE = contextvars.ContextVar("glmkit_pdl", default=False)


@contextlib.contextmanager
def scope(on: bool):
    """Launches inside use PDL if `on` (and GLMKIT_PDL does not say otherwise)."""
    token = _SCOPE.set(on)
    try:
        yield
    finally:
        _SCOPE.reset(token)


@functools.lru_cache(maxsize=None)
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device, kernel: str) -> bool:
    """Whether `kernel` (its name in GLMKIT_PDL's list, if one is given) launches with PDL on `device`."""
    setting = os.environ.get("GLMKIT_PDL", "")
    if device.type != "cuda" or not _SUPPORTED or setting == "0":
        return False
    if setting == "" and not _SCOPE.get():
        return False
    if setting not in ("", "1") and kernel not in setting.split(","):
        return False
    return _device_ok(device.index if device.index is not None else torch.cuda.current_device())


def launch(device: torch.device, kernel: str) -> dict:
    """Keyword arguments for launching `kernel` on `device`: the PDL constexpr and, when on, `launch_pdl`."""
    if enabled(device, kernel):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
