"""virtio-console with ``socket=PATH``: takes clients on the socket made
before the sandbox (``sock.accept`` is ``accept4``)."""

SYSCALLS = ("accept4", "accept")
