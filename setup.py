"""The compiled part of glmkit: two optional C extensions, the int8 x int8 CPU product (src/glmkit/kernels/cpu_int8.c)
and the small operations of a CPU decode step (src/glmkit/kernels/cpu_decode.c).

Built at install time with a C compiler and OpenMP (gcc, clang with libomp), the int8 product on x86-64 only;
`optional=True`: where one does not build, the install goes on and glmkit runs fbgemm's product instead
(models/cpu_int8.py logs which), or PyTorch's operations in place of the decode step's.
Everything else is in pyproject.toml."""

import platform
import sys

from setuptools import Extension, setup

extensions = []
if platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux"):
    extensions.append(Extension("glmkit.kernels._cpu_int8", ["src/glmkit/kernels/cpu_int8.c"],
                                extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"],
                                optional=True))
if sys.platform.startswith("linux"):
    # no errno or FP traps to keep: lets floorf and the clamps vectorize; results are the same IEEE operations
    extensions.append(Extension("glmkit.kernels._cpu_decode", ["src/glmkit/kernels/cpu_decode.c"],
                                extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
                                extra_link_args=["-fopenmp", "-lm"], optional=True))

setup(ext_modules=extensions)
