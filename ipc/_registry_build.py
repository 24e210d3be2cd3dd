"""cffi build script for the registry's C core (API mode).

Run by setuptools through ``cffi_modules`` during ``pip install``; the
result is the extension module ``ipc._registry_c``.  The declarations come
from ``_registry.h``, which the C source includes too, so the two cannot
drift apart.
"""
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "_registry.h").read_text())
ffibuilder.set_source(
    "ipc._registry_c",
    '#include "_registry.c"',
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread"],
    depends=[str(HERE / name) for name in ("_registry.c", "_registry.h", "_rlock.h")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
