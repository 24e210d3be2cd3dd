"""cffi build script for virtio-blk's C core (API mode): the extension
module ``devices._blkring_c``, built by ``pip install`` through
``cffi_modules`` (setup.py); declarations in ``_blkring.h``."""
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "_blkring.h").read_text())
ffibuilder.set_source(
    "devices._blkring_c",
    '#include "_blkring.c"',
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    depends=[str(HERE / "_blkring.c"), str(HERE / "_blkring.h")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
