"""Guest image loaders.

Each loader reads one image format, writes it and its boot structures
into guest memory, and returns what the vCPUs need to start
(:class:`vmm.boot.pvh.PvhBoot`).  ``elf`` parses, ``pvh`` configures.
"""

from vmm.endpoint import VmmError


class BootError(VmmError):
    """The guest image cannot be loaded (format, size, placement)."""
