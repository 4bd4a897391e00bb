"""Build the native kernels: native/*.pyx -> transfer._native.<name>.

Metadata lives in pyproject.toml; this file only lists the Cython extensions,
which setuptools cannot yet declare there without an experimental table.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

CFLAGS = ["-O3", "-Wall", "-Wno-unused-function"]

# blockhash links Debian's libxxhash (libxxhash-dev) for its run-time SIMD dispatch;
# blockstatus links libnbd (libnbd-dev), the C library under python3-libnbd.
LIBRARIES = {"blockhash": ["xxhash"], "blockstatus": ["nbd"]}

extensions = [
    Extension(f"transfer._native.{name}", [f"native/{name}.pyx"], extra_compile_args=CFLAGS,
              libraries=LIBRARIES.get(name, []))
    for name in ("zeroscan", "blockhash", "fileops", "intervals", "blockstatus")
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
