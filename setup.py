"""The native reader engine, a C extension built by `pip install .` (metadata in pyproject.toml).

It is optional: where no C compiler (or no Python headers) is present the build warns and the
package installs without it; the reader then uses its Python thread engine and says so once."""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mlx_flash.reader._native",
            ["mlx_flash/reader/_native.c"],
            extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE"] if sys.platform != "win32" else [],
            extra_link_args=["-pthread"] if sys.platform != "win32" else [],
            optional=True,
        )
    ]
)
