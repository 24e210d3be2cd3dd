"""Device models, one per module, placement-agnostic.

A model imports nothing from :mod:`ipc`, :mod:`vmm` or :mod:`devserver`: it
talks to a :class:`devices.base.DeviceHost` (claim and release regions; the
VMM implements it for in-process placement, devserver over shared memory
for a separate process) and serves accesses through
:meth:`devices.base.Device.read` and :meth:`devices.base.Device.write`.
"""
