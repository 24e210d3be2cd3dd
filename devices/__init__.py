"""Device models, one per module, placement-agnostic.

A model imports nothing from :mod:`ipc`, :mod:`vmm` or :mod:`devserver`: it
talks to a :class:`devices.base.DeviceHost` (the public API: regions,
interrupts, guest memory, doorbells, the console, and the typed errors;
the VMM implements it for in-process placement, devserver over shared
memory for a separate process) and serves accesses through
:meth:`devices.base.Device.read` and :meth:`devices.base.Device.write`.
:mod:`devices.kinds` says which class a ``--device TYPE`` names.  Every
model keeps its guest-visible state as a snapshot it can restore
(:class:`devices.base.Device`, "Snapshots"); :mod:`devices.snapshot`
checks one as untrusted input.
"""
