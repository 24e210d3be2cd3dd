"""The virtual machine: KVM objects, guest RAM, the registry, devices and
vCPU threads, from set-up to teardown.

Set-up (Documentation/virt/kvm/api.rst): KVM_CREATE_VM, KVM_SET_TSS_ADDR,
KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2 (dummy speaker), guest RAM in a memfd
(:mod:`vmm.memory`), vCPUs with the CPUID of KVM_GET_SUPPORTED_CPUID (APIC
id patched per vCPU), a fresh registry in a sealed memfd (nothing in /dev/shm, and a device
cannot truncate it under the VMM; every vCPU wait on its lock has the
deadline ``lock_timeout``, see :mod:`vmm.lockwatch`), and the VMM's own
ports (test exit, power off).  :meth:`Machine.run` starts one thread per
vCPU and waits for the first ending (:mod:`vmm.outcome`); :meth:`close`
stops and joins the vCPUs, closes every device (killing device
processes), and closes the registry -- on every path, Ctrl-C and guest
crashes included.

The same class is the Python API (README, "Python API"): devices by their
``--device`` text or as keywords (:meth:`Machine.add_device`), the console
of ``vmm run --serial`` (``serial="capture"`` keeps the output in memory,
:attr:`Machine.console`), the default COM1, scratch disk images, a run in
the background (:meth:`Machine.start`, :meth:`Machine.wait`); ``vmm run``
(:mod:`vmm.cli`) sets a machine up through the same calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

from devices.base import ConsoleFds, DeviceError
from devices.faults.table import FaultError
from ipc import Bus, Registry, RegistryError
from ipc.registry import DEFAULT_CAPACITY, DEFAULT_LOCK_TIMEOUT
from vmm import cpuid as cpuids
from vmm import kvm, layout
from vmm.boot import pvh
from devices.base import Space, Window
from devices.pci import PciDevice
from vmm.coalesce import CoalescedMmio
from vmm.config import ConfigError, DeviceSpec, parse_device_spec
from vmm.console import Console, SerialMode, parse_serial
from vmm.dispatch import Dispatcher
from vmm.endpoint import FIRST_DEVICE_OWNER, VMM_OWNER, DeviceFailed, Endpoint, VmmError
from vmm.faults import FaultsError, MachineFaults
from vmm.irq import IrqRouter
from vmm.local import LocalEndpoint, VmmHandlers
from vmm.memory import GuestMemory, parse_size
from vmm.outcome import Ending, Outcome
from vmm.pci import PciHost
from vmm.qmp import events as qmp_events
from vmm.qmp.events import EventHub
from vmm.remote.options import RemoteOptions
from vmm.vcpu import KICK_SIGNAL, VcpuThread
from vmm.windows import OwnerWindows, WindowError

if TYPE_CHECKING:
    import pathlib

    from vmm.forkserver import ForkServer
    from vmm.qmp.server import QmpServer
    from vmm.remote.endpoint import Launched, RemoteEndpoint

# vmm.remote.endpoint (the device-process stack: protocol, transport, slots,
# ~14 ms to import) is imported with the first device process or service:
# a machine without one never needs it (start-up, issue 15).


def _is_remote(endpoint: object) -> TypeGuard[RemoteEndpoint]:
    """Whether ``endpoint`` serves a device in a process of its own (a
    :class:`vmm.remote.RemoteEndpoint`; none exists before its module is
    imported)."""
    module = sys.modules.get("vmm.remote.endpoint")
    return module is not None and isinstance(endpoint, module.RemoteEndpoint)

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 256 * layout.MiB
#: How long an access to a device process may take before it counts as failed.
DEFAULT_ACCESS_TIMEOUT = 1.0
#: Extra time a vCPU thread gets to leave after being asked to stop.
STOP_GRACE = 2.0
#: How often vCPU 0 is checked for HLT with interrupts off (a clean stop).
HALT_CHECK = 0.5


class DeviceNotFound(VmmError):
    """No device has that id."""


class Interrupted(BaseException):
    """Raised in the main thread by a SIGTERM/SIGHUP handler (see vmm.cli)."""

    def __init__(self, signo: int):
        super().__init__(signo)
        self.signo = signo


class Machine:
    """One VM.  Use as a context manager, or call :meth:`close`.

    ``memory``: bytes or a size text (``"64M"``); ``devices``: device
    specs added at once (:meth:`add_device`); ``serial``: the console of
    COM1 and of virtio-consoles without ``socket=`` -- ``"none"`` (the
    default here: no console, no COM1), ``"capture"`` (output kept in
    :attr:`console`), ``"stdio"`` or ``"file:PATH"`` as ``vmm run
    --serial``; with a console a COM1 is added when the run starts unless a
    serial device was added.  ``log_dir``: each device process's stderr
    goes to ``log_dir/ID.log`` (:attr:`device_logs`).  ``forkserver``:
    fork the device processes from a fork server (:mod:`vmm.forkserver`)
    instead of exec'ing each (None: ``SPLITVMM_FORKSERVER=1`` says)."""

    def __init__(self, memory: int | str = DEFAULT_MEMORY, vcpus: int = 1, *,
                 registry_capacity: int = DEFAULT_CAPACITY,
                 access_timeout: float = DEFAULT_ACCESS_TIMEOUT, fast_path: bool | None = None,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT, devices: Iterable[str | DeviceSpec] = (),
                 serial: str | SerialMode = "none", log_dir: str | os.PathLike[str] | None = None,
                 cpuid_hide: tuple[str, ...] = (), forkserver: bool | None = None):
        if isinstance(memory, str):
            try:
                memory = parse_size(memory)
            except ValueError as e:
                raise ConfigError(f"memory: {e}") from None
        #: CPUID features hidden from every vCPU (vmm.cpuid names).
        self.cpuid_hide = tuple(cpuid_hide)
        if not 0 < lock_timeout < 1e6:
            raise ConfigError(f"lock timeout {lock_timeout!r}: must be a positive number of seconds")
        self.access_timeout = access_timeout
        #: Deadline of every registry call a vCPU makes; a device holding
        #: the lock longer is killed (vmm.lockwatch).
        self.lock_timeout = lock_timeout
        #: How device processes are started and served (poll window...);
        #: the machine fills in access_timeout, guest memory, console and
        #: interrupt routing for each device.
        self.remote_options = RemoteOptions()
        #: Fork device processes from a fork server of this machine's own
        #: (vmm.forkserver; started with the first device process), unless
        #: remote_options names one already; default (``forkserver=None``):
        #: the environment's SPLITVMM_FORKSERVER=1, else each is exec'd
        #: (read with the first device process: :attr:`use_forkserver`).
        self._use_forkserver = forkserver
        self._forkserver: ForkServer | None = None
        self.outcome: Outcome | None = None
        self.endpoints: dict[int, Endpoint] = {}
        self.vcpus: list[VcpuThread] = []
        self._vcpu_fds: list[kvm.Vcpu] = []
        self._next_owner = FIRST_DEVICE_OWNER
        self._end_lock = threading.Lock()
        self._ended = threading.Event()
        self._booted = False
        self._started = False
        self._closed = False
        self._stuck = False
        self.kvm: kvm.Kvm | None = None
        self.vm: kvm.Vm | None = None
        self.memory: GuestMemory | None = None
        self.registry: Registry | None = None
        self.irq: IrqRouter | None = None
        #: STOP, RESUME, SHUTDOWN and DEVICE_FAILED, to whoever subscribes
        #: (the control socket, vmm.qmp).
        self.events = EventHub()
        #: owner -> the spec each device was started from.
        self.device_specs: dict[int, DeviceSpec] = {}
        #: monotonic times of the run's start and end (None until then).
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._failures: dict[int, str] = {}
        self._failure_lock = threading.Lock()
        self._pause_lock = threading.Lock()
        self._paused = False
        self._qmp_quit = False
        self._api: QmpServer | None = None
        #: The console (vmm.console): ``console.expect(regex)``,
        #: ``console.text`` with serial="capture"; None with serial="none".
        self.console: Console | None = None
        #: The ids taken so far (parse_device_spec's default names).
        self._taken: set[str] = set()
        self._serial_added = False
        #: The COM1 the machine added itself (None: none was added).
        self.default_serial: DeviceSpec | None = None
        self._runner: threading.Thread | None = None
        self._runner_errors: list[BaseException] = []
        #: The thread of _release_pit (None until the run ends).
        self._pit_release: threading.Thread | None = None
        self.run_timeout: float | None = None
        #: Owners unplugged with remove_device (their failures are not news).
        self._removed: set[int] = set()
        self._scratch: list[pathlib.Path] = []
        self._log_dir: pathlib.Path | None = None
        if log_dir is not None:
            import pathlib      # (only here and in scratch_image: start-up, issue 15)
            self._log_dir = pathlib.Path(log_dir)
        #: The open log files of spawned devices (log_dir), closed at close().
        self._log_fds: list[int] = []
        #: device id -> the file its process's stderr went to (log_dir).
        self.device_logs: dict[str, pathlib.Path] = {}
        try:
            mode = parse_serial(serial, capture=True) if isinstance(serial, str) else serial
        except ValueError as e:
            raise ConfigError(f"serial: {e}") from None
        #: How the console was asked for (SerialMode).
        self.serial = mode
        #: Fault injection (vmm.faults): plan, trace, arm/disarm/list/trace.
        self.faults = MachineFaults(self)
        try:
            if fast_path is None:
                fast_path = os.environ.get("SPLITVMM_SLOW_PATH", "") in ("", "0")
            self._setup(memory, vcpus, registry_capacity, fast_path)
            if mode.kind != "none":
                self.console = Console.open(mode)
            for spec in devices:
                self.add_device(spec)
        except BaseException:
            self.close()
            raise

    def _setup(self, memory: int, nvcpus: int, registry_capacity: int, fast_path: bool) -> None:
        kvm.install_kick_handler(KICK_SIGNAL)
        self.kvm = kvm_ = kvm.Kvm()
        if not 1 <= nvcpus <= min(kvm_.max_vcpus, 255):
            raise ConfigError(f"--vcpus {nvcpus}: this host allows 1 to {min(kvm_.max_vcpus, 255)}")
        self.vm = vm = kvm_.create_vm()
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        # Guest RAM before the irqchip: a memory slot added after it waits
        # for an SRCU grace period in the kernel (4-8 ms here), before it
        # 0.1 ms.  (The PIT's own grace periods come at the end of the run:
        # _release_pit.)
        self.memory = memory_ = GuestMemory(memory)
        memory_.register(vm)
        vm.create_irqchip()
        vm.create_pit2(kvm.PIT_SPEAKER_DUMMY)
        #: GSI routing and irqfds of every device (vmm.irq).
        self.irq = IrqRouter(vm)
        cpuid = kvm_.supported_cpuid()
        for i in range(nvcpus):
            fd = vm.create_vcpu(i)
            self._vcpu_fds.append(fd)
            fd.set_cpuid(cpuids.build(cpuid, i, self.cpuid_hide))
        self.registry = registry = Registry.create_sealed(capacity=registry_capacity, lock_timeout=self.lock_timeout)
        #: What each owner may claim, in the VMM's memory (vmm.windows).
        self.windows = OwnerWindows(VMM_OWNER)
        self.vmm_handlers = VmmHandlers(registry, self.windows)
        self.endpoints[self.vmm_handlers.owner] = self.vmm_handlers
        #: Coalesced-MMIO zones and the ring (vmm.coalesce).
        self.coalesced = CoalescedMmio.for_vm(kvm_, vm, self._vcpu_fds[0])
        self.dispatcher = Dispatcher(registry, self.endpoints, on_fatal=self.end,
                                     on_failure=lambda ep, e: self._note_failure(ep.owner, str(e)),
                                     coalesced=self.coalesced, windows=self.windows)
        self.vmm_handlers.add(Bus.PIO, layout.TEST_EXIT_PORT, layout.TEST_EXIT_LENGTH, write=self._test_exit)
        self.vmm_handlers.add(Bus.PIO, layout.POWER_OFF_PORT, layout.POWER_OFF_LENGTH, write=self._power_off)
        self.vmm_handlers.add(Bus.PIO, layout.VCPU_PARK_PORT, layout.VCPU_PARK_LENGTH, write=self._park)
        #: PCI configuration mechanism #1 and the host bridge (vmm.pci).
        self.pci = PciHost(self.dispatcher, self.vmm_handlers)
        self.vcpus = [VcpuThread(fd, self.dispatcher, memory_, self.end, fast=fast_path)
                      for fd in self._vcpu_fds]

    @property
    def _live_registry(self) -> Registry:
        """The registry, which _setup made before anything uses it."""
        assert self.registry is not None
        return self.registry

    @property
    def _live_memory(self) -> GuestMemory:
        """Guest RAM, which _setup made before anything uses it."""
        assert self.memory is not None
        return self.memory

    # -- guest and devices ---------------------------------------------

    def load(self, image: str | os.PathLike[str] | bytes, cmdline: str = "") -> pvh.PvhBoot:
        """Load a guest: a PVH ELF image, as a path or its bytes."""
        return self.load_pvh(image, cmdline)

    def load_pvh(self, image, cmdline: str = "") -> pvh.PvhBoot:
        """Load a PVH ELF (path or bytes) and put every vCPU at its entry."""
        boot = pvh.load(self._live_memory, image, cmdline)
        for fd in self._vcpu_fds:
            pvh.enter(fd, boot)
        self._booted = True
        return boot

    def load_linux(self, kernel, initrd=None, cmdline: str = "", boot: str = "auto"):
        """Load a Linux kernel (bzImage or PVH vmlinux, :mod:`vmm.boot.linux`)
        with the VMM's ACPI tables; vCPU 0 starts at the kernel's entry,
        the others wait for INIT/SIPI (KVM_MP_STATE_UNINITIALIZED) as on
        real hardware.  Returns the :class:`vmm.boot.linux.LoadedKernel`."""
        from vmm.boot import acpi, linux
        rsdp = acpi.write(self._live_memory, len(self._vcpu_fds))
        loaded = linux.load(self._live_memory, kernel, initrd, cmdline, boot=boot, rsdp=rsdp)
        loaded.enter(self._vcpu_fds[0])
        for fd in self._vcpu_fds[1:]:
            fd.set_mp_state(kvm.MP_STATE_UNINITIALIZED)
        self._booted = True
        log.info("kernel %s: %s", kernel, loaded.description)
        return loaded

    def _new_owner(self) -> int:
        owner = self._next_owner
        self._next_owner += 1
        return owner

    def add_device(self, spec: str | DeviceSpec, console: ConsoleFds | None = None,
                   **params: Any) -> Endpoint:
        """Start a device as its spec places it; returns its endpoint.

        ``spec``: the text of ``vmm run --device``
        (``"virtio-blk,path=disk.img,id=blk"``), a type with its parameters
        as keywords (``add_device("virtio-blk", path="disk.img", id="blk")``;
        ``True``/``False`` become ``on``/``off``), or a parsed
        :class:`~vmm.config.DeviceSpec`.  ``console``: descriptors the
        device may use as its line (the caller keeps them); without them
        the first serial device and every virtio-console without
        ``socket=`` get the machine's :attr:`console`, if it has one."""
        if isinstance(spec, str):
            spec = parse_device_spec(_spec_text(spec, params), self._taken | set())
        elif params:
            raise TypeError("keyword parameters go with a device type, not a DeviceSpec")
        return self.add_devices([(spec, console)])[0]

    def add_devices(self, devices: Sequence[tuple[DeviceSpec, ConsoleFds | None]],
                    on_error: Callable[[DeviceSpec, VmmError], None] | None = None) -> list[Endpoint]:
        """Start several devices ((spec, console) pairs, as :meth:`add_device`
        takes them); returns their endpoints in that order.

        The processes of the isolated ones are all started first, so they
        start up (interpreter, imports, model) in parallel; then each
        device comes up in the order given -- an inline one is built, an
        isolated one's handshake runs -- so regions are claimed in the
        same order as by :meth:`add_device` one after another.  When one
        fails, ``on_error(spec, error)`` is called with the spec as given (it may raise another
        error instead), the processes not yet up are killed, and the error
        is raised; the devices already up stay (closed with the machine)."""
        items: list[tuple[DeviceSpec, ConsoleFds | None]] = []
        fresh: list[str] = []           # ids taken here: free again if their device fails
        serial_given = self._serial_added
        for spec, console in devices:
            if spec.name not in self._taken:    # specs parsed one by one may share a default id
                fresh.append(spec.name)
                self._taken.add(spec.name)
            if console is None and self.console is not None and (
                    spec.kind == "serial" and not serial_given
                    or spec.kind == "virtio-console" and "socket" not in spec.param_dict()):
                console = self.console.attach(spec.name, first=spec.kind == "serial")
            serial_given = serial_given or spec.kind == "serial"
            items.append((spec, console))
        placed: list[tuple[DeviceSpec, int, ConsoleFds | None]] = []
        launched: dict[int, Launched] = {}
        current: DeviceSpec | None = None
        endpoints: list[Endpoint] = []
        try:
            try:
                for i, (spec, console) in enumerate(items):
                    current = spec
                    spec = self.pci.place(spec)     # a PCI device gets its slot and BAR windows
                    placed.append((spec, self._new_owner(), console))
                    self._grant_windows(spec, placed[-1][1])
                    if spec.placement != "inline" and spec.connect is None:
                        launched[i] = self._launch_isolated(spec, placed[-1][1], console)
                for i, (spec, owner, console) in enumerate(placed):
                    current = items[i][0]           # the caller's spec, as given
                    endpoint: Endpoint
                    try:
                        if i in launched:
                            endpoint = launched.pop(i).finish()
                        elif spec.connect is not None:
                            endpoint = self._attach_service(spec, owner, console)
                        else:
                            endpoint = self._create_inline(spec, owner, console)
                    except BaseException:
                        self.pci.release(spec)      # its slot is free again
                        raise
                    self.endpoints[owner] = endpoint
                    self.device_specs[owner] = spec
                    if spec.kind == "serial":
                        self._serial_added = True
                    self._settle_windows(spec, owner)
                    # (after the BAR probe, so that the probe's accesses
                    # count for no fault trigger)
                    try:
                        self.faults.attach(endpoint, spec)
                    except (FaultsError, DeviceFailed) as e:
                        raise ConfigError(f"device {spec.name}: {e}") from None
                    except FaultError as e:
                        raise ConfigError(str(e)) from None
                    log.info("device %s (%s, %s) is owner %d", spec.name, spec.kind, spec.placement, owner)
                    self._warn_unreachable(spec.name, owner)
                    endpoints.append(endpoint)
                return endpoints
            except VmmError as e:
                up = {ep.name for ep in endpoints}
                self._taken.difference_update(n for n in fresh if n not in up)   # device_add may retry
                if current is not None and current is self.default_serial:
                    raise ConfigError(f"{e} (the default serial device takes ports 0x3f8-0x3ff; --serial none, "
                                      "or serial=\"none\" in Python, leaves them free)") from None
                if on_error is not None and current is not None:
                    on_error(current, e)
                raise
        finally:
            for pending in launched.values():
                pending.abandon()

    def _on_console(self, spec: DeviceSpec) -> bool:
        """Whether a device gets the console: the first serial device, and
        every virtio-console without a socket of its own."""
        if spec.kind == "serial":
            return not self._serial_added
        return spec.kind == "virtio-console" and "socket" not in spec.param_dict()

    def with_default_serial(self, specs: list[DeviceSpec]) -> list[DeviceSpec]:
        """``specs``, plus the COM1 that :meth:`run` would add (the machine
        has a console and none of them is a serial device), so that all
        of a run's devices are known before any starts (a fault plan may
        name COM1).  Add every one with :meth:`add_device`."""
        if self.console is None or self._serial_added or any(s.kind == "serial" for s in specs):
            return list(specs)
        self.default_serial = parse_device_spec("serial", self._taken | {s.name for s in specs})
        return [*specs, self.default_serial]

    def _add_default_serial(self) -> None:
        """COM1 on the console, unless a serial device is there already."""
        if self.console is None or self._serial_added:
            return
        [*_, spec] = self.with_default_serial([])
        self.add_device(spec)

    def scratch_image(self, size: int | str = 16 * layout.MiB, prefix: str = "svm-") -> pathlib.Path:
        """A new sparse raw disk image of ``size`` bytes (or ``"16M"``) in
        the temporary directory, removed at :meth:`close`.  (The default
        prefix keeps the file name within virtio-blk's 20-byte id.)"""
        if isinstance(size, str):
            size = parse_size(size)
        import pathlib
        import tempfile

        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".img")
        path = pathlib.Path(name)
        self._scratch.append(path)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return path

    def _grant_windows(self, spec: DeviceSpec, owner: int) -> None:
        """Before the device starts: what a non-PCI class declares from its
        parameters is all it may ever be reached at (vmm.windows)."""
        if issubclass(spec.model_class, PciDevice) or spec.connect is not None:
            return
        try:
            self.windows.grant_model(owner, spec.model_class.windows(spec.param_dict()))
        except (DeviceError, WindowError, ValueError) as e:
            raise ConfigError(f"device {spec.name}: its windows: {e}") from None

    def _settle_windows(self, spec: DeviceSpec, owner: int) -> None:
        """Once the device is up, before the guest runs: a PCI function's
        configuration space and BARs are sized (the guest's BAR writes
        move them later); a service completes its parameters itself, so
        the VMM cannot evaluate its class's windows: what it registered at
        attach is pinned as its windows."""
        if issubclass(spec.model_class, PciDevice):
            # A device added while the guest runs (device_add): the guest
            # may be rescanning, and a BAR it writes between the probe's
            # sizing write and its restore would be lost, so the vCPUs wait.
            with self._vcpus_held():
                self.pci.probe_bars(owner, int(spec.param_dict()["slot"], 0))
        elif spec.connect is not None:
            self.windows.grant_model(owner, [Window(Space(int(r.bus)), r.start, r.length, r.cookie)
                                             for r in self._live_registry.regions()
                                             if r.owner == owner and not r.removing])

    def _create_inline(self, spec: DeviceSpec, owner: int, console: ConsoleFds | None) -> Endpoint:
        try:
            return LocalEndpoint.create(spec.model_class, spec.param_dict(), owner, spec.name, self._live_registry,
                                        console, irq_router=self.irq, memory=self._guest_ram(),
                                        coalesced=self.coalesced)
        except (RegistryError, DeviceError) as e:
            self._live_registry.unregister_owner(owner)
            raise ConfigError(f"device {spec.name}: {e}") from None

    def _guest_ram(self):
        """Guest RAM for inline models (one shared bounds-checked view)."""
        if getattr(self, "_ram_view", None) is None:
            from devices.guestmem import GuestRam
            self._ram_view = GuestRam(self._live_memory.view, self._live_memory.regions)
        return self._ram_view

    def _warn_unreachable(self, name: str, owner: int) -> None:
        """MMIO regions on top of RAM never see an access: say so."""
        for r in self._live_registry.regions():
            if r.owner == owner and r.bus == Bus.MMIO and any(
                    r.start < ram.end and ram.guest_addr < r.start + r.length for ram in self._live_memory.regions):
                log.warning("device %s: MMIO region %#x+%#x overlaps guest RAM; the guest cannot reach it",
                            name, r.start, r.length)

    def _spawn_isolated(self, spec: DeviceSpec, owner: int, console: ConsoleFds | None = None) -> Endpoint:
        return self._launch_isolated(spec, owner, console).finish()

    def _launch_isolated(self, spec: DeviceSpec, owner: int, console: ConsoleFds | None = None) -> Launched:
        stderr = None
        if self._log_dir is not None:
            # Kept open until close(): a restarted process of the device
            # logs to the same file.
            path = self._log_dir / f"{spec.name}.log"
            self._log_dir.mkdir(parents=True, exist_ok=True)
            stderr = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            self._log_fds.append(stderr)
            self.device_logs[spec.name] = path
        from vmm.remote.endpoint import RemoteEndpoint

        launched = RemoteEndpoint.launch(spec.kind, spec.param_dict(), owner, spec.name, self._live_registry,
                                         len(self._vcpu_fds), self._device_options(spec, console, stderr))
        launched.on_event = lambda name, data: self._device_event(owner, name, data)
        return launched

    def _attach_service(self, spec: DeviceSpec, owner: int, console: ConsoleFds | None = None) -> Endpoint:
        """A ``connect=PATH`` device: the service's process, reached over its socket."""
        from vmm.remote.connect import attach_service

        assert spec.connect is not None
        endpoint = attach_service(spec.connect, spec.kind, spec.param_dict(), owner, spec.name, self._live_registry,
                                  len(self._vcpu_fds), self._device_options(spec, console))
        endpoint.on_event = lambda name, data: self._device_event(owner, name, data)
        return endpoint

    def _device_event(self, owner: int, name: str, data: dict) -> None:
        """An event of device process ``owner``'s endpoint: its failure
        is noted once, as any other (:meth:`_note_failure`); its restart
        events go out as they are."""
        if name == qmp_events.DEVICE_FAILED:
            self._note_failure(owner, data.get("reason") or "failed")
        else:
            self.events.emit(name, data)

    @property
    def use_forkserver(self) -> bool:
        """Whether device processes come from a fork server (the
        ``forkserver`` argument; None: ``SPLITVMM_FORKSERVER=1`` in the
        environment, looked up the first time a device process starts --
        the fork server's client is imported only by a machine that has
        device processes)."""
        if self._use_forkserver is None:
            from vmm.forkserver import FORKSERVER_ENV

            self._use_forkserver = os.environ.get(FORKSERVER_ENV) == "1"
        return self._use_forkserver

    @use_forkserver.setter
    def use_forkserver(self, on: bool) -> None:
        self._use_forkserver = on

    def _device_options(self, spec: DeviceSpec, console: ConsoleFds | None,
                        stderr: int | None = None) -> RemoteOptions:
        """``stderr``: where a spawned device process's log goes (log_dir)."""
        from ipc.protocol import MemRegion, SetConsole

        if self.use_forkserver and self.remote_options.forkserver is None and spec.placement == "isolated":
            from vmm.forkserver import ForkServer

            self._forkserver = ForkServer.start()
            self.remote_options = dataclasses.replace(self.remote_options, forkserver=self._forkserver)
        return dataclasses.replace(
            self.remote_options, access_timeout=self.access_timeout, memfd=self._live_memory.fd,
            mem_regions=tuple(MemRegion(r.guest_addr, r.size, r.offset) for r in self._live_memory.regions),
            irq_router=self.irq, coalesced=self.coalesced, sandbox=spec.sandbox, seccomp=spec.seccomp,
            stderr=stderr, restart=spec.restart, state=spec.state,
            console=None if console is None else SetConsole(out_fd=console.output, in_fd=console.input))

    # -- hot unplug (QMP device_del; device_add is add_device) ---------------

    def owner_of(self, name: str) -> int | None:
        """The registry owner of device ``name`` (its ``id=``), or None."""
        for owner, endpoint in self.endpoints.items():
            if owner != self.vmm_handlers.owner and endpoint.name == name:
                return owner
        return None

    def remove_device(self, name: str) -> None:
        """Unplug device ``name`` while the guest runs, as a surprise
        removal: its regions leave the registry at once (from then on its
        configuration space and BARs read all ones, as an empty slot's),
        accesses already inside it finish (bounded by the access
        deadline), then its process is stopped and its interrupts,
        doorbells and PCI slot are freed.  A device that fails on the way
        out is not reported as failed."""
        owner = self.owner_of(name)
        if owner is None:
            raise DeviceNotFound(f"no device {name!r}")
        endpoint = self.endpoints[owner]
        registry = self.registry
        assert registry is not None
        self._removed.add(owner)
        registry.unregister_owner(owner)
        deadline = time.monotonic() + self.access_timeout + STOP_GRACE
        while any(r.owner == owner for r in registry.regions()) and time.monotonic() < deadline:
            time.sleep(0.001)   # an access in flight holds a reference: it ends by its deadline
        del self.endpoints[owner]
        spec = self.device_specs.pop(owner, None)
        try:
            endpoint.close()
        finally:
            registry.unregister_owner(owner)     # anything it claimed on the way out
            self.windows.revoke(owner)          # its slot's windows go with it
            if spec is not None:
                self.pci.release(spec)
            if spec is not None and spec.kind == "serial":
                self._serial_added = any(s.kind == "serial" for s in self.device_specs.values())
            self._taken.discard(name)
        log.info("device %s (owner %d) removed", name, owner)
        self.events.emit(qmp_events.DEVICE_DELETED, {"device": name, "path": f"/machine/peripheral/{name}"})

    def add_handler(self, bus: Bus, start: int, length: int, read=None, write=None) -> None:
        """Serve ``[start, start + length)`` with VMM functions (owner VMM)."""
        self.vmm_handlers.add(bus, start, length, read, write)

    # -- the VMM's own ports ---------------------------------------------

    def _test_exit(self, vcpu: int, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.end(Outcome(Ending.TEST_EXIT, f"guest wrote {value:#x} to the test-exit port", value=value,
                             vcpu=vcpu))

    def _power_off(self, vcpu: int, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 2 and value & layout.POWER_OFF_SLP_EN:
            self.end(Outcome(Ending.POWER_OFF, "guest powered off (PM1a SLP_EN)", vcpu=vcpu))

    def _park(self, vcpu: int, offset: int, size: int, value: int) -> None:
        self.vcpus[vcpu].request_park()

    # -- running -------------------------------------------------------------

    def end(self, outcome: Outcome | None) -> None:
        """Record the run's ending (the first one wins) and stop every vCPU.

        None means a vCPU was parked: the run ends once all of them are."""
        if outcome is None:
            if not all(v.parked for v in self.vcpus):
                return
            outcome = Outcome(Ending.POWER_OFF, "every vCPU parked itself")
        with self._end_lock:
            if self.outcome is not None:
                return
            self.outcome = outcome
        self.ended_at = time.monotonic()
        log.debug("%s", outcome)
        self._ended.set()
        if self.console is not None:
            self.console.run_ended()
        for v in self.vcpus:
            v.request_stop()
        self.events.emit(qmp_events.SHUTDOWN, qmp_events.shutdown_data(outcome, self._qmp_quit))

    def run(self, timeout: float | None = None) -> Outcome:
        """Run the guest until it ends, ``timeout`` seconds pass, or the
        main thread is interrupted; returns the outcome."""
        if not self._booted:
            raise VmmError("no guest loaded")
        if self._started:
            raise VmmError("a machine runs once")
        self._add_default_serial()
        self._started = True
        #: The timeout the run was given (for a reproducing command line).
        self.run_timeout = timeout
        if self.console is not None:
            self.console.start(on_quit=lambda: self.end(Outcome(
                Ending.QUIT, "the user quit from the console (Ctrl-A x)")))
        self.started_at = time.monotonic()
        deadline = None if timeout is None else self.started_at + timeout
        try:
            for v in self.vcpus:
                v.start()
            while True:
                left = HALT_CHECK if deadline is None else min(HALT_CHECK, deadline - time.monotonic())
                if left <= 0:
                    self.end(Outcome(Ending.TIMEOUT, f"no ending within {timeout:g} s"))
                    break
                if self._ended.wait(left):
                    break
                self._check_devices()
                if not self._paused:
                    self.vcpus[0].check_halt()
        except KeyboardInterrupt:
            self.end(Outcome(Ending.INTERRUPTED, "interrupted by SIGINT", value=signal.SIGINT))
        except Interrupted as e:
            self.end(Outcome(Ending.INTERRUPTED, f"interrupted by {signal.Signals(e.signo).name}", value=e.signo))
        finally:
            self._stop_vcpus()
            self._release_pit()
        assert self.outcome is not None
        return self.outcome

    def _release_pit(self) -> None:
        """Once no vCPU will run again: unhook the in-kernel PIT's tick
        re-injection in a thread of its own.  That waits for two SRCU grace
        periods in the kernel (7-16 ms here), which the VM fd's close would
        otherwise wait for at the very end of :meth:`close`; this way they
        pass while the devices shut down.  The guest never runs again, so
        it cannot tell."""
        if self._pit_release is not None or self._stuck or self.vm is None:
            return
        vm = self.vm

        def release() -> None:
            try:
                vm.set_pit_reinject(False)
            except kvm.KvmError as e:   # harmless: the close does the same
                log.debug("%s", e)

        self._pit_release = threading.Thread(target=release, name="pit-release", daemon=True)
        self._pit_release.start()

    def start(self, timeout: float | None = None) -> None:
        """Run the guest in the background (a thread doing :meth:`run`);
        :meth:`wait` for its outcome.  Errors of the set-up (no guest, the
        default COM1 refused) are raised here."""
        if not self._booted:
            raise VmmError("no guest loaded")
        if self._started or self._runner is not None:
            raise VmmError("a machine runs once")
        self._add_default_serial()
        self.run_timeout = timeout

        def runner() -> None:
            try:
                self.run(timeout)
            except BaseException as e:      # kept for wait()
                self._runner_errors.append(e)
                self.end(Outcome(Ending.VMM_ERROR, f"the run failed: {type(e).__name__}: {e}"))

        self._runner = threading.Thread(target=runner, name="machine-run", daemon=True)
        self._runner.start()

    def wait(self, timeout: float | None = None) -> Outcome:
        """Wait for the end of a run begun with :meth:`start`; returns its
        outcome.  Raises :class:`TimeoutError` if it goes on past
        ``timeout`` seconds (the run goes on)."""
        if self._runner is None:
            raise VmmError("the machine was not started (start())")
        self._runner.join(timeout)
        if self._runner.is_alive():
            raise TimeoutError(f"the guest still runs after {timeout:g} s")
        if self._runner_errors:
            raise self._runner_errors[0]
        assert self.outcome is not None
        return self.outcome

    @property
    def running(self) -> bool:
        """Whether the guest runs now (started, not ended)."""
        return self._started and self.outcome is None

    def _stop_vcpus(self) -> None:
        for v in self.vcpus:
            v.request_stop()
        # A vCPU may be in an access (access deadline) or dealing with a
        # registry lock holder (lock deadlines, vmm.lockwatch).
        deadline = time.monotonic() + self.access_timeout + 3 * self.lock_timeout + STOP_GRACE
        for v in self.vcpus:
            if not v.join(max(0.0, deadline - time.monotonic())):
                self._stuck = True
                log.error("vCPU %d did not stop; its resources are leaked", v.index)

    # -- control (vmm.qmp: the same commands as the control socket) -------

    @property
    def run_state(self) -> str:
        """prelaunch, running, paused or shutdown (QEMU's RunState names)."""
        if self.outcome is not None:
            return "shutdown"
        if self._paused:
            return "paused"
        return "running" if self._started else "prelaunch"

    def pause(self) -> bool:
        """Hold every vCPU outside KVM_RUN, waiting, until :meth:`resume`
        (QMP ``stop``; event STOP).  False when it was paused already.
        Before :meth:`run` the vCPUs start paused."""
        with self._pause_lock:
            if self.outcome is not None:
                raise VmmError("the run has ended")
            if self._paused:
                return False
            # A vCPU inside an access leaves it within the access deadline.
            deadline = time.monotonic() + self.access_timeout + 3 * self.lock_timeout + STOP_GRACE
            late = [v.index for v in self.vcpus if not v.pause(max(0.0, deadline - time.monotonic()))]
            self._paused = True
            self.events.emit(qmp_events.STOP)
        if late:
            raise VmmError(f"vCPU {', '.join(map(str, late))} did not stop in time; it stops when "
                           "its access ends")
        return True

    @contextlib.contextmanager
    def _vcpus_held(self) -> Iterator[None]:
        """Keep every vCPU out of KVM_RUN for the block, if the guest runs
        (no STOP/RESUME events: a pause of the VMM's own, not the user's)."""
        with self._pause_lock:
            if not self._started or self._paused or self.outcome is not None:
                yield
                return
            deadline = time.monotonic() + self.access_timeout + 3 * self.lock_timeout + STOP_GRACE
            held = [v for v in self.vcpus if v.pause(max(0.0, deadline - time.monotonic()))]
            try:
                if len(held) != len(self.vcpus):
                    raise VmmError("a vCPU did not stop in time for a device's BARs to be sized")
                yield
            finally:
                for v in self.vcpus:
                    v.resume()

    def resume(self) -> bool:
        """Let every vCPU run again (QMP ``cont``; event RESUME).  False
        when it was not paused."""
        with self._pause_lock:
            if self.outcome is not None:
                raise VmmError("the run has ended")
            if not self._paused:
                return False
            self._paused = False
            for v in self.vcpus:
                v.resume()
            self.events.emit(qmp_events.RESUME)
        return True

    def quit(self) -> None:
        """End the run as the user asked (QMP ``quit``; status 12)."""
        self._qmp_quit = True
        self.end(Outcome(Ending.QUIT, "quit through the control socket (QMP quit)"))

    def device_failure(self, owner: int) -> str | None:
        """Why device ``owner`` was cut off, or None while it works."""
        self._check_devices()
        return self._failures.get(owner)

    def _check_devices(self) -> None:
        """Notice device processes that failed with no access to see it."""
        for owner, endpoint in list(self.endpoints.items()):
            if owner not in self._failures:
                reason = endpoint.failed if _is_remote(endpoint) else None
                if reason:
                    self._note_failure(owner, reason)
                elif owner in self.dispatcher.failed:
                    self._note_failure(owner, "failed")

    def _note_failure(self, owner: int, reason: str) -> None:
        if owner in self._removed:
            return
        with self._failure_lock:
            if owner in self._failures:
                return
            self._failures[owner] = reason
        endpoint = self.endpoints.get(owner)
        spec = self.device_specs.get(owner)
        self.events.emit(qmp_events.DEVICE_FAILED, {
            "device": endpoint.name if endpoint is not None else str(owner),
            "kind": spec.kind if spec is not None else None, "reason": reason})

    def qmp(self, command: str, **arguments):
        """Run a control command (the table of :mod:`vmm.qmp.commands`),
        e.g. ``machine.qmp("query-regions", bus="mmio")``; returns its
        ``return`` value, raises :class:`vmm.qmp.QmpError`."""
        from vmm.qmp.commands import execute
        return execute(self, command, arguments)

    def query_status(self) -> dict:
        return self.qmp("query-status")

    def query_devices(self) -> list:
        return self.qmp("query-devices")

    def query_regions(self, **filters) -> list:
        return self.qmp("query-regions", **filters)

    def query_stats(self, **filters) -> list:
        return self.qmp("query-stats", **filters)

    def serve_api(self, path: str | os.PathLike) -> QmpServer:
        """Serve the control socket (QMP) at ``path`` until :meth:`close`."""
        from vmm.qmp.server import QmpServer
        if self._api is not None:
            raise VmmError("the control socket is served already")
        self._api = QmpServer(self, path)
        return self._api

    # -- teardown --------------------------------------------------------

    def close(self) -> None:
        """Stop everything and release every resource (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._runner is not None:
            self.end(Outcome(Ending.QUIT, "the machine was closed while the guest ran"))
            self._runner.join(self.access_timeout + 3 * self.lock_timeout + 2 * STOP_GRACE + HALT_CHECK)
        if self._started:
            self._stop_vcpus()
        self._release_pit()
        if self._api is not None:
            self._api.close()       # before the registry and devices it reads go
        # Device processes are shut down all at once (each close waits for its
        # process to exit); then the VMM's own endpoints, last added first.
        remote = [(o, ep) for o, ep in self.endpoints.items() if _is_remote(ep)]
        closers = [threading.Thread(target=self._close_endpoint, args=item, name=f"close-{item[1].name}")
                   for item in remote]
        for t in closers:
            t.start()
        for t in closers:
            t.join()
        for owner, endpoint in sorted(self.endpoints.items(), reverse=True):
            if not _is_remote(endpoint):
                self._close_endpoint(owner, endpoint)
        if self.console is not None:
            self.console.close()        # after the devices that wrote to it
        for path in self._scratch:
            path.unlink(missing_ok=True)
        for fd in self._log_fds:
            os.close(fd)
        self._log_fds.clear()
        self.faults.close()
        if self._forkserver is not None:
            self._forkserver.close()        # after its device processes
        if self.registry is not None:
            if not self._stuck:
                self.registry.close()
        if self._stuck:
            return  # a vCPU thread may still touch its fd and guest RAM
        for vcpu_fd in self._vcpu_fds:
            vcpu_fd.close()
        if self._pit_release is not None:
            self._pit_release.join(5.0)     # else the close below waits for the kernel instead
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None:
            self.kvm.close()
        if getattr(self, "_ram_view", None) is not None:
            try:
                self._ram_view.release()
            except BufferError as e:   # a model still holds a window on it
                log.warning("guest RAM view still in use at teardown: %s", e)
            self._ram_view = None
        if self.memory is not None:
            self.memory.close()

    @staticmethod
    def _close_endpoint(owner: int, endpoint: Endpoint) -> None:
        try:
            endpoint.close()
        except Exception as e:
            log.error("closing device %s: %s", getattr(endpoint, "name", owner), e)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spec_text(kind: str, params: dict[str, Any]) -> str:
    """``kind,key=value,...`` from keyword parameters (the ``--device`` text)."""
    items = []
    for key, value in params.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        items.append(f"{key}={value}")
    return ",".join([kind, *items])


def _cpuid_for(table: kvm.Cpuid, apic_id: int) -> kvm.Cpuid:
    """The supported CPUID with this vCPU's APIC id filled in (leaf 1
    EBX[31:24]; leaves 0xB and 0x1F EDX, the x2APIC id) and the KVM
    signature leaves (vmm.cpuid)."""
    return cpuids.build(table, apic_id)
