"""Set-up shared by the Triton kernel tests; import it before any glmkit kernel module.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET must be set before
triton is first imported); where triton is not installed at all, the importing test module is skipped.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
