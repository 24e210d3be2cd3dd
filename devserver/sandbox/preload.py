"""Layer 1: import now everything the device process will need later.

Inside the sandbox ``open`` answers EACCES, so a lazy import, an encoding
looked up for the first time or a ``linecache`` read for a traceback fails
there.  This layer imports the modules the runtime, the models and the
logging/traceback paths use, the model class's own module (already
imported by the kind lookup) and the codecs in use, and formats one
traceback so that everything on that path is loaded."""

from __future__ import annotations

import codecs
import importlib
import logging
import sys
import traceback

#: Modules imported lazily somewhere on the device's paths (_blake2, _sha256
#: and random: by the fault engine, only when a fault fires or is armed;
#: not hashlib, which would load OpenSSL, ~4 MB, into every process).
MODULES = (
    "encodings", "encodings.utf_8", "encodings.ascii", "encodings.latin_1", "encodings.idna",
    "json", "struct", "select", "selectors", "socket", "threading", "queue", "mmap", "errno",
    "logging", "logging.handlers", "traceback", "linecache", "tokenize", "faulthandler", "signal",
    "weakref", "msgpack", "msgpack.fallback", "random", "_blake2", "_sha256", "dataclasses", "enum", "stat", "resource",
    "devices.guestmem", "devices.virtio.virtqueue",
)


#: Done already in this interpreter: a device the fork server forked
#: after its own preload (devserver.forkserver) has all of it, and doing it
#: again would only copy the pages it touches (~0.4 MB a device, issue 15).
_done = False


def apply() -> None:
    global _done
    if _done:
        return
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass        # optional (msgpack.fallback when the C extension is there)
    for enc in (sys.getfilesystemencoding(), sys.getdefaultencoding(), "utf-8", "ascii", "latin-1"):
        codecs.lookup(enc)
    try:
        raise RuntimeError("preload")
    except RuntimeError:
        traceback.format_exc()  # loads the traceback machinery (not the source lines)
    from devserver.sandbox import seccomp
    seccomp.fill_syscall_names()    # the seccomp layer's table, here where a fork server shares it
    logging.getLogger(__name__).debug("preloaded %d modules", len(sys.modules))
    _done = True
