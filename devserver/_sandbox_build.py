"""cffi build script for the device-process sandbox (API mode).

Run by setuptools through ``cffi_modules`` during ``pip install``; the
result is ``devserver._sandbox_c``: libseccomp (its header comes from
Debian's ``libseccomp-dev``, which ``make install`` installs when
``/usr/include/seccomp.h`` is missing), the few system calls Python 3.11
lacks (unshare, mount, pivot_root, capset, prctl, Landlock) and the SIGSYS
report of ``seccomp=trap``.  Declarations in ``_sandbox.h``.
"""
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "_sandbox.h").read_text())
ffibuilder.set_source(
    "devserver._sandbox_c",
    '#include "_sandbox.c"',
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["seccomp"],
    depends=[str(HERE / name) for name in ("_sandbox.c", "_sandbox.h")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
