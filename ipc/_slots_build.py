"""cffi build script for the access slots' C core (API mode).

Run by setuptools through ``cffi_modules`` during ``pip install``; the
result is the extension module ``ipc._slots_c``.  The declarations come
from ``_slots.h``, which the C source includes too.
"""
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "_slots.h").read_text())
ffibuilder.set_source(
    "ipc._slots_c",
    '#include "_slots.c"',
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    depends=[str(HERE / "_slots.c"), str(HERE / "_slots.h")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
