"""The interface between a device model and whatever hosts it.

The same model runs inside the VMM (``process=inline``) or in a device
process (``process=isolated``); only the :class:`DeviceHost` differs.  Like
Firecracker's bus, a model is told the *offset* of an access inside one of
its regions, never the absolute address, plus the ``cookie`` it chose when
it claimed that region, so it can tell its windows apart.
"""

from __future__ import annotations

import abc
import enum
from typing import TYPE_CHECKING, Protocol

from devices.faults.engine import FaultEngine
from devices.faults.hook import SILENT, FaultPoints
from devices.record import record

if TYPE_CHECKING:
    from devices.guestmem import GuestRam
    from devices.hostres import HostResource


class Space(enum.IntEnum):
    """Address spaces, numbered as :class:`ipc.Bus` numbers them."""

    PIO = 0
    MMIO = 1
    PCI = 2


def all_ones(size: int) -> int:
    """The value of a ``size``-byte read nobody answers (all bits set);
    also the mask of a ``size``-byte value."""
    return _ONES.get(size) or (1 << (8 * size)) - 1


_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


# -- errors ------------------------------------------------------------------
#
#   DeviceError
#   ├── BadParameter        a model rejects its parameters
#   ├── BadState            restore: a snapshot the model refuses
#   ├── NoSnapshot          the model keeps no snapshot (cannot be restored)
#   ├── GuestMemoryFault    a guest-physical range that is not guest RAM
#   └── HostRefused         the host will not grant a request
#       ├── RegionBusy      claim: the range overlaps a registered region
#       ├── RegionTableFull claim: the host's region table is full
#       ├── RegionNotHeld   release: this device holds no region there
#       └── NotOffered      the host offers no such thing at all
#
# Both hosts (inline in the VMM, remote in a device process) raise exactly
# these; a model catches what it can handle and lets the rest fail the
# access (an access that raises fails the device).


class DeviceError(Exception):
    """Base of the errors device models and their hosts raise."""


class BadParameter(DeviceError):
    """A device parameter (from the command line or a config) is invalid."""


class BadState(DeviceError):
    """:meth:`Device.restore`: the snapshot is not one this model (with
    these parameters) could have taken -- a wrong type, a value out of
    range, a key missing or unknown, a list too long, registers that
    contradict each other.  The model is left exactly as it was."""


class NoSnapshot(DeviceError):
    """The model does not implement :meth:`Device.snapshot` /
    :meth:`Device.restore`: it can be started again, but not with its
    state."""


class GuestMemoryFault(DeviceError):
    """A guest-physical range that is not (wholly) guest RAM
    (:class:`devices.guestmem.GuestRam`)."""


class HostRefused(DeviceError):
    """The host will not grant a request: an interrupt pin outside 0-23, an
    MSI address outside 0xFEExxxxx, an ioeventfd outside the device's
    regions, more than a device may hold, or no answer from the VMM."""


class RegionBusy(HostRefused):
    """:meth:`DeviceHost.claim`: the range overlaps a registered region
    (this device's or another's)."""


class RegionTableFull(HostRefused):
    """:meth:`DeviceHost.claim`: the host's region table has no room."""


class RegionNotHeld(HostRefused):
    """:meth:`DeviceHost.release`: this device holds no region starting
    there (never claimed, released already, or reaped by the VMM when it
    cut the device off)."""


class NotOffered(HostRefused):
    """The host offers no such thing at all: no interrupt controller, no
    guest memory, no ioeventfds (a host built to validate parameters, a
    device process started without them)."""


class Interrupt(Protocol):
    """One interrupt source a host handed to a model."""

    def trigger(self) -> None:
        """Signal it once (an edge; through an irqfd when isolated)."""


@record
class ConsoleFds:
    """The byte console a host hands a model (a UART's line): bytes the
    model sends go to ``output``, bytes it receives come from ``input``
    (-1: none).  The host owns both descriptors."""

    output: int
    input: int


class Doorbell(Protocol):
    """One ioeventfd (:meth:`DeviceHost.ioeventfd`)."""

    #: The eventfd to poll (nonblocking; read it to consume the count).
    fd: int

    def remove(self) -> None:
        """Unbind it from the guest address and close the eventfd."""


class MsiVector(Interrupt, Protocol):
    """An MSI vector: program it with the address/data pair the guest
    wrote into the MSI-X table, then trigger it (PCI Local Bus 3.0 6.8,
    PCIe 6.0 7.7.2)."""

    def program(self, address: int, data: int) -> None:
        """Route this vector to ``address``/``data`` (a KVM MSI route).

        May be called from inside an access handler (an MSI-X table
        write); again to change the route.  The host refuses an address
        outside 0xFEExxxxx, or more routes than a device may hold, with
        :class:`HostRefused`.  Program a complete entry (e.g. when the
        guest unmasks it), not each dword as it is written: a half-written
        address may be refused.  Masking and pending bits are the model's:
        it does not trigger a masked vector, it sets its PBA bit and
        triggers on unmask."""

    def unprogram(self) -> None:
        """Drop the route (a trigger after this is dropped)."""


class DeviceHost(abc.ABC):
    """What a model may ask of its host: the API a model is written against.

    The VMM's inline host (:class:`vmm.local.LocalHost`) and a device
    process's (:class:`devserver.host.RemoteHost`) implement it all;
    every refusal is a :class:`HostRefused` subclass.  The defaults here
    are a host that offers nothing beyond regions (:class:`NotOffered`).
    """

    #: The device's fault engine (:mod:`devices.faults`), set by whoever
    #: runs the device; the interrupts a host hands out look it up at each
    #: trigger (the ``irq`` point, :class:`devices.faults.apply.FaultyInterrupt`).
    fault_engine: FaultEngine = SILENT

    @abc.abstractmethod
    def claim(self, space: Space, start: int, length: int, cookie: int = 0, *,
              coalesce: bool = False) -> None:
        """Register ``[start, start + length)`` for this device; its
        accesses reach the model with ``cookie`` and the offset in it.

        May be called from inside :meth:`Device.write` (a device that moves
        its own window).  ``coalesce=True`` (MMIO only) lets the VMM queue
        the guest's writes there and deliver them in order, batched, before
        the next access that reaches this device (KVM coalesced MMIO);
        reads are never coalesced.  Raises :class:`RegionBusy` (overlap),
        :class:`RegionTableFull`, :class:`HostRefused` (an empty or
        wrapping range, or a coalesced zone the host does not grant: not
        MMIO, no coalesced MMIO in KVM, too many zones; the region is not
        claimed then).  :meth:`release` drops the zone with the region."""

    def adopt(self, space: Space, start: int, length: int, cookie: int = 0, *,
              coalesce: bool = False) -> None:
        """Take over a region a previous process of this device left
        registered, or claim it if the range is free: what a restored
        model calls in :meth:`Device.start` instead of :meth:`claim`
        (see "Snapshots" in :class:`Device`).

        The VMM keeps a device's regions registered under its owner id
        while the device is restarted, so the new process finds them
        there: a region of this owner with exactly this start, length
        and cookie is adopted as it is (no gap in which the guest's
        accesses would miss).  Anything else overlapping the range
        raises :class:`RegionBusy`, as :meth:`claim` does.  The default
        (a host whose regions do not outlive a process) is
        :meth:`claim`."""
        if coalesce:
            self.claim(space, start, length, cookie, coalesce=True)
        else:
            self.claim(space, start, length, cookie)

    def release_unadopted(self) -> int:
        """Release every region of this owner that neither :meth:`claim`
        nor :meth:`adopt` took through this host: what a dead process
        held and the restored model does not (a window it was moving
        when it died).  Called once, after :meth:`Device.start` of a
        restored model (:func:`resume`); returns how many were
        released.  The default host keeps none."""
        return 0

    @abc.abstractmethod
    def release(self, space: Space, start: int) -> None:
        """Unregister this device's region starting at ``start`` (raises
        :class:`RegionNotHeld` when there is none)."""

    @abc.abstractmethod
    def process_id(self) -> int:
        """The pid of the process the model runs in."""

    def console(self) -> ConsoleFds | None:
        """The console given to this device (``vmm run --serial``), or
        None (no console: not an error)."""
        return None

    def irq_line(self, gsi: int) -> Interrupt:
        """An interrupt on the in-kernel irqchip's input ``gsi`` (ISA IRQ
        4 for COM1, or a PCI INTx line), for the model to trigger.
        Raises :class:`HostRefused` (a pin outside 0-23, more pins than a
        device may hold; :class:`NotOffered`: no irqchip)."""
        raise NotOffered("this host has no interrupt controller")

    def msi_vector(self, index: int) -> MsiVector:
        """The model's MSI (MSI-X table entry) number ``index``: the host
        turns it into a KVM MSI route when the model programs it
        (:meth:`MsiVector.program`).  :class:`NotOffered`: no irqchip."""
        raise NotOffered("this host has no interrupt controller")

    def guest_memory(self) -> GuestRam:
        """Guest RAM, by guest-physical address, bounds-checked
        (:class:`devices.guestmem.GuestRam`).  Raises :class:`NotOffered`
        when the host has none."""
        raise NotOffered("this host gives the device no guest memory")

    def ioeventfd(self, space: Space, address: int, length: int,
                  datamatch: int | None = None) -> Doorbell:
        """A doorbell: an eventfd that KVM signals on each guest write of
        ``length`` bytes at ``address`` (inside a region this device has
        claimed; writes of ``datamatch`` only, when given), with no exit
        to the VMM.  The model polls :attr:`Doorbell.fd` and calls
        :meth:`Doorbell.remove` before the region moves or goes (also
        from inside an access handler).  Raises :class:`HostRefused` (not
        this device's region, too many; :class:`NotOffered`: no VM)."""
        raise NotOffered("this host has no ioeventfds")


@record
class Window:
    """A guest range a model may have regions in, as its class declares it
    from its parameters (:meth:`Device.windows`).  The VMM grants what the
    class declares when it starts the device (in the VMM, before any device
    process exists) and treats a region outside its owner's windows as
    unclaimed; a PCI model's windows (its configuration space and BARs)
    are the VMM's own business and not declared here.

    ``region_max`` None: the window is pinned -- a region starts at
    ``start`` and is at most ``length`` bytes; otherwise it is an area a
    self-relocating model moves its region in: the region lies inside
    ``[start, start + length)`` and is at most ``region_max`` bytes.
    ``cookie`` None: any cookie."""

    space: Space
    start: int
    length: int
    cookie: int | None = None
    region_max: int | None = None


class Device(FaultPoints, abc.ABC):
    """Base class of device models.

    Subclasses set ``kind`` (a name for logs; the ``TYPE`` of ``--device
    TYPE,...`` is its entry point in the ``splitvmm.devices`` group, or
    ``MODULE:CLASS``, :mod:`devices.kinds`), parse their parameters in
    ``__init__`` (raising :class:`BadParameter`; the host may not be used
    there: the VMM builds a model once on a host that refuses everything,
    to check its parameters before the guest starts), claim their regions
    in :meth:`start`, and serve accesses.  ``read``/``write`` may be called
    from several threads at once (one per vCPU): a model keeps its own
    lock.  An exception out of ``read``/``write`` fails the device (its
    regions are removed, the VM goes on).

    Fault points (:class:`devices.faults.hook.FaultPoints`): every model has
    ``access`` and ``process``, served by its host; a model names its
    other points in ``fault_points`` and hits them with
    ``self.fault_point(name, **match)``.

    **Snapshots** (what lets the VMM restart a device process with the
    guest noticing nothing but a pause):

    * :meth:`snapshot` returns *all guest-visible state* -- every
      register value a read could return, every pending interrupt,
      queued byte, counter, moved window -- as plain data only: ``dict``
      (``str`` keys), ``list``, ``str``, ``int``, ``bytes``, ``bool``,
      ``float``, ``None``.  Parameters (``key=value`` of ``--device``,
      e.g. an image path) are not state: the new model is built with the
      same ones.  Host resources (descriptors, routes) are not state
      either.  It is called between accesses; it takes the model's own
      lock.
    * :meth:`restore` loads such a dict into a **freshly constructed**
      model (same class, same parameters), *before* :meth:`start`.  The
      dict is **untrusted input**: it comes from the state segment of a
      process that died and may have been compromised.  Check every key,
      type (``type(v) is int``: a ``bool`` is not an ``int`` here),
      range and length, and that the registers agree with each other,
      *before* changing anything; on anything wrong raise
      :class:`BadState` and leave the model as it was, so the caller can
      still :meth:`start` it fresh.  Restore uses no host resource (it
      may look at :meth:`DeviceHost.guest_memory` to check addresses).
    * :meth:`start` then runs as usual, on the restored state: it
      re-takes what the state says the model holds.  The VMM keeps a
      device's regions registered under its owner id, its irqfds,
      MSI routes and ioeventfds bound while it restarts, and hands the
      same ones to the new process when asked again.  So a restored
      model calls :meth:`DeviceHost.adopt` for each region it holds
      (not :meth:`DeviceHost.claim`; adopt claims a free range too, so a
      ``start`` may simply always adopt); asks for its interrupt lines,
      MSI vectors (re-programming the routes of unmasked entries) and
      doorbells again with the same arguments; sends **no** interrupt
      that the state says was sent already (an edge that was delivered
      is not repeated; a pending one stays pending); and looks once at
      the work a doorbell may have announced while it was down (a
      virtio queue).  After ``start``, :func:`resume` releases what the
      dead process held and the state does not
      (:meth:`DeviceHost.release_unadopted`).  Anything a runtime adds
      from its own records goes between ``restore`` and ``start`` (the
      virtqueues' in-flight requests:
      :meth:`devices.virtio.core.VirtioCore.resume_inflight`).

    A model that does not implement the pair raises :class:`NoSnapshot`
    (the default): it can only be started again from power-on.
    :mod:`devices.snapshot` has the checking helpers the built-in models
    use.
    """

    kind = ""
    #: System calls the model makes beyond the common allowlist of a
    #: sandboxed device process (devserver/sandbox/policy/common.py), by
    #: name, e.g. ``("getrandom",)``: the seccomp filter of a model that is
    #: not built in allows exactly the common part plus these.
    syscalls: tuple[str, ...] = ()

    @classmethod
    def host_resources(cls, params: dict[str, str]) -> tuple[HostResource, ...]:
        """Host files and listening sockets the model will take with
        :func:`devices.hostres.open_file` / :func:`~devices.hostres.listen_unix`
        given these parameters; a device process opens them before its
        sandbox.  Must not touch anything itself."""
        return ()

    def __init__(self, host: DeviceHost, **params: str):
        self.host = host
        if params:
            raise BadParameter(f"{self.kind}: unknown parameter(s): {', '.join(sorted(params))}")

    @classmethod
    def windows(cls, params: dict[str, str]) -> list[Window]:
        """The windows a device of this class with these ``--device``
        parameters may claim regions in (:class:`Window`); called in the
        VMM at spawn.  The default is none: a model that is not a PCI
        function and does not declare its windows has every region refused.
        Bad parameters: raise :class:`BadParameter` (or return []; the
        model's constructor reports them)."""
        return []

    def start(self) -> None:
        """Claim the device's initial regions."""

    @abc.abstractmethod
    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        """Value of a ``size``-byte read at ``offset`` in region ``cookie``."""

    @abc.abstractmethod
    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        """A ``size``-byte write of ``value`` at ``offset`` in region ``cookie``."""

    def stop(self) -> None:
        """Release what the device holds; called once, at teardown."""

    def snapshot(self) -> dict:
        """All guest-visible state as plain data (class docstring)."""
        raise NoSnapshot(f"{self.kind or type(self).__name__}: this model keeps no snapshot")

    def restore(self, state: dict) -> None:
        """Load :meth:`snapshot`'s dict into this fresh model, before
        :meth:`start`; :class:`BadState` and no change on anything wrong
        (class docstring)."""
        raise NoSnapshot(f"{self.kind or type(self).__name__}: this model keeps no snapshot")

    def packed_snapshot(self) -> bytes:
        """Optional fast form of :meth:`snapshot` for the store before
        every answer of a device process: the msgpack encoding (binary
        type for ``bytes``) of a map that decodes to a dict equal to
        :meth:`snapshot`'s, taken under the same lock.  A model may keep
        the encoding of what did not change and write only the integers
        that did.  The runtime uses it only when the class that defines
        it also defines :meth:`snapshot` (:func:`packs_snapshot`), so a
        subclass that changes its state without it falls back safely."""
        raise NoSnapshot(f"{self.kind or type(self).__name__}: this model has no packed snapshot")


def packs_snapshot(cls: type) -> bool:
    """Whether ``cls`` gives its snapshot packed (:meth:`Device.packed_snapshot`):
    the class that defines it is also the one that defines ``snapshot``."""
    snap = pack = None
    for klass in cls.__mro__:
        if snap is None and "snapshot" in klass.__dict__:
            snap = klass
        if pack is None and "packed_snapshot" in klass.__dict__:
            pack = klass
    return pack is not None and pack is snap and pack is not Device


def resume(model: Device, state: dict) -> int:
    """Restore a freshly built ``model`` from ``state`` and start it on
    what the VMM kept for it (the "Snapshots" contract of
    :class:`Device`); returns the number of stale regions released.
    :class:`BadState` (or :class:`NoSnapshot`) leaves the model as built:
    the caller may :meth:`Device.start` it fresh instead."""
    model.restore(state)
    model.start()
    return model.host.release_unadopted()


def parse_int(kind: str, key: str, text: str) -> int:
    """An integer parameter (decimal or 0x-hex), or a clear error."""
    try:
        return int(text, 0)
    except ValueError:
        raise BadParameter(f"{kind}: {key}={text!r} is not an integer") from None
