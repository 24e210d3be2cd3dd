"""cffi build script (API mode) of the KVM bindings: ``vmm._kvm_c``.

Run by setuptools through ``cffi_modules`` during ``pip install``.  The
cdef (``_kvm.h``) declares constants and structs with ``...`` so that the
compiler fills them in from ``<linux/kvm.h>``; ``_kvm.c`` names the members
of ``struct kvm_run``'s anonymous union and installs the kick handler;
``_vcpu.h``/``_vcpu.c`` are the exit fast path (it calls ipc's registry
through function pointers, with ``ipc/_registry.h`` for the types).
"""
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
IPC = HERE.parent / "ipc"      # _registry.h: struct svm_ref and return codes

ffibuilder = FFI()
ffibuilder.cdef((HERE / "_kvm.h").read_text() + (HERE / "_vcpu.h").read_text())
ffibuilder.set_source(
    "vmm._kvm_c",
    '#include "_kvm.c"\n#include "_vcpu.h"\n#include "_vcpu.c"',
    include_dirs=[str(HERE), str(IPC)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
    depends=[str(HERE / name) for name in ("_kvm.c", "_kvm.h", "_vcpu.c", "_vcpu.h")]
    + [str(IPC / "_registry.h"), str(IPC / "_slots.h")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
