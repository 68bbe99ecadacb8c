"""The compiled part of glmkit: one optional C extension, the int8 x int8 CPU product (src/glmkit/kernels/cpu_int8.c).

Built at install time on x86-64 with a C compiler and OpenMP (gcc, clang with libomp); `optional=True`: where it
does not build, the install goes on and glmkit runs fbgemm's product instead (models/cpu_int8.py logs which).
Everything else is in pyproject.toml."""

import platform
import sys

from setuptools import Extension, setup

extensions = []
if platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux"):
    extensions.append(Extension("glmkit.kernels._cpu_int8", ["src/glmkit/kernels/cpu_int8.c"],
                                extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"],
                                optional=True))

setup(ext_modules=extensions)
