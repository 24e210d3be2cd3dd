"""``vmm``, the command line of the VMM.

``vmm run --guest FILE.elf [--vcpus N] [--memory SIZE] [--device SPEC]...
[--timeout SECONDS] [--cmdline TEXT] [--access-timeout SECONDS]
[--lock-timeout SECONDS] [--serial stdio|file:PATH|none] [--api PATH]`` runs a PVH
guest and exits with the status of its ending (:mod:`vmm.outcome`: 0 clean
stop, odd test exit, 2 bad arguments, 4 guest reset, 6 KVM failure, 8
timeout, 10 VMM error, 12 quit (Ctrl-A x or QMP quit), 128 + signal when interrupted).  Bad
arguments give one line on stderr.

Every run has a 16550A UART at COM1 (0x3f8, IRQ 4, in its own process)
wired to the console (:mod:`vmm.console`; ``--serial stdio`` by default),
unless ``--serial none``; a ``--device serial,...`` given explicitly takes
its place (the first one gets the console).  A virtio-console without
``socket=PATH`` shares the console with it: both write to it, and the
input goes to COM1 until ``Ctrl-A c`` passes it to the next device.

``vmm run`` without ``--guest`` builds and boots the demo guest
(``vmm/guests/demo.c``) with virtio-rng, virtio-blk (on a temporary 16 MiB
raw image, removed when the run ends) and virtio-console next to the
serial console, each in its own process.  Every run ends with a one-line
summary on stderr: how the guest ended and which process served which
device.

``--faults PLAN.toml [--fault-seed N] [--fault-trace FILE]`` or
``--fault-replay TRACE`` inject faults (:mod:`vmm.faults`, README "Fault
injection"); the closing summary then lists the firings per fault.

``--api PATH`` serves the control socket (QMP's wire protocol,
:mod:`vmm.qmp`) for the run; ``vmm ctl PATH COMMAND [key=value...]``
runs one command on it and prints the answer (:mod:`vmm.qmp.ctl`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NoReturn, Sequence

from ipc.registry import DEFAULT_LOCK_TIMEOUT
from vmm import outcome as outcomes
from vmm import cpuid as cpuids
from vmm.boot import BootError
from vmm.console import ConsoleError, SerialMode, parse_serial
from vmm.endpoint import VMM_OWNER, ConfigError, VmmError
from vmm.machine import DEFAULT_ACCESS_TIMEOUT, DEFAULT_MEMORY, Interrupted, Machine
from vmm.memory import GuestMemoryError, parse_size

if TYPE_CHECKING:
    import pathlib

    from vmm.config import DeviceSpec
    from vmm.forkserver import ForkServer

# What only some runs use is imported where they use it (start-up, issue
# 15): the Linux loader (--kernel), the fault plan and trace (--faults,
# --fault-replay, --fault-trace), the control socket (--api, ctl), the
# device-process stack (vmm.remote: a device in its own process), the fork
# server's client, the device specs (vmm.config, the kinds), and what only
# help texts show (the kinds, QMP's commands).

log = logging.getLogger("vmm")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and status 2, and
    help texts that cost something to make are made when help is printed
    (:meth:`lazy_help`)."""

    def __init__(self, *, formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter,
                 **kwargs) -> None:
        # argparse makes a formatter for every add_argument (to check the
        # metavar), and one without a width imports shutil (bz2, lzma, zlib:
        # ~1.5 ms of every run) for the terminal's; that width is needed
        # only when help is printed.
        self._formatter = formatter_class
        super().__init__(formatter_class=functools.partial(formatter_class, width=80), **kwargs)
        self._lazy: list[tuple[argparse.Action | None, Callable[[], str]]] = []

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def lazy_help(self, action: argparse.Action | None, make: Callable[[], str]) -> None:
        """``action``'s help (None: the epilog) is ``make()``, called the
        first time this parser's help is formatted."""
        self._lazy.append((action, make))

    def format_usage(self) -> str:
        self.formatter_class = self._formatter
        return super().format_usage()

    def format_help(self) -> str:
        self.formatter_class = self._formatter
        for action, make in self._lazy:
            if action is None:
                self.epilog = make()
            else:
                action.help = make()
        self._lazy.clear()
        return super().format_help()


class _KernelBoots:
    """The choices of ``--kernel-boot`` (:data:`vmm.boot.linux.KERNEL_BOOTS`),
    read from the Linux loader only when argparse checks a value given or
    prints them."""

    @staticmethod
    def _boots() -> tuple[str, ...]:
        from vmm.boot.linux import KERNEL_BOOTS

        return KERNEL_BOOTS

    def __contains__(self, value: object) -> bool:
        return value in self._boots()

    def __iter__(self) -> Iterator[str]:
        return iter(self._boots())


def _positive_int(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return n


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _serial(text: str) -> SerialMode:
    try:
        return parse_serial(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < s < 1e9:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return s


def _cpuid_hide(text: str) -> tuple[str, ...]:
    try:
        return cpuids.parse_hide(text)
    except cpuids.CpuidError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


#: Kernel command line of --kernel without --append: the console on COM1.
DEFAULT_APPEND = "console=ttyS0 earlyprintk=serial"


def _seed(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= n < 2**64:
        raise argparse.ArgumentTypeError(f"{text} must be in 0..2**64-1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vmm", description="splitvmm: a KVM VMM whose devices run as separate processes")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    run = sub.add_parser("run", help="run a guest", epilog=outcomes.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--guest", metavar="FILE.elf",
                     help="PVH ELF image to boot (default: the demo guest, with its own devices)")
    run.add_argument("--vcpus", type=_positive_int, default=1, metavar="N", help="number of vCPUs (default 1)")
    run.add_argument("--memory", type=_size, default=DEFAULT_MEMORY, metavar="SIZE",
                     help="guest RAM, e.g. 256M or 1G (default 256M)")
    device = run.add_argument("--device", action="append", default=[], metavar="SPEC")
    run.lazy_help(device, _device_help)
    run.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                     help="end the run (status 8) after this long")
    run.add_argument("--cmdline", default="", metavar="TEXT", help="guest command line (PVH start info)")
    run.add_argument("--kernel", metavar="FILE",
                     help="a Linux kernel to boot: a bzImage or an ELF vmlinux with a PVH note (vmm.boot.linux)")
    run.add_argument("--initrd", metavar="FILE", help="initial RAM disk of --kernel")
    run.add_argument("--append", default=None, metavar="TEXT",
                     help=f"kernel command line of --kernel (default {DEFAULT_APPEND!r})")
    # (choices set after add_argument, which would list them to check its metavar)
    kernel_boot = run.add_argument("--kernel-boot", default="auto",
                                   help="how a bzImage boots: pvh (payload decompressed on the host, PVH "
                                        "entry), bzimage (64-bit boot protocol), auto (pvh on a PVM host, "
                                        "else bzimage)")
    kernel_boot.choices = _KernelBoots()
    run.add_argument("--cpuid-hide", type=_cpuid_hide, default=(), metavar="FEATURE,...",
                     help="CPUID features to hide from the guest, e.g. cx16,xsave,popcnt (vmm.cpuid)")
    run.add_argument("--access-timeout", type=_seconds, default=DEFAULT_ACCESS_TIMEOUT, metavar="SECONDS",
                     help=f"deadline of one access to a device process (default {DEFAULT_ACCESS_TIMEOUT:g})")
    run.add_argument("--lock-timeout", type=_seconds, default=DEFAULT_LOCK_TIMEOUT, metavar="SECONDS",
                     help="deadline of a vCPU's wait for the registry lock; a device process that "
                          f"holds it longer is killed (default {DEFAULT_LOCK_TIMEOUT:g})")
    run.add_argument("--serial", type=_serial, default=parse_serial("stdio"), metavar="stdio|file:PATH|none",
                     help="the console of COM1 and of virtio-consoles without socket=: stdio (default; raw "
                          "terminal, Ctrl-A x quits, Ctrl-A c switches the input), file:PATH (output only), "
                          "none (no console, no COM1)")
    run.add_argument("--faults", metavar="PLAN.toml",
                     help="a fault plan (README \"Fault injection\"; TOML, or JSON when it ends in .json), "
                          "validated against the devices before the guest starts")
    run.add_argument("--fault-seed", type=_seed, metavar="N", help="the plan's seed instead of its own")
    run.add_argument("--fault-trace", metavar="FILE",
                     help="write every firing of every device to FILE (JSON Lines, header with plan digest "
                          "and seed)")
    run.add_argument("--fault-replay", metavar="TRACE",
                     help="re-apply exactly the firings of TRACE (a --fault-trace file) by device, point "
                          "and event number, instead of a plan")
    run.add_argument("--api", metavar="PATH",
                     help="serve the control socket (QMP's wire protocol, mode 0600) at PATH; "
                          "see `vmm ctl`")
    ctl = sub.add_parser("ctl", help="run one command on a VM's control socket",
                         description="Run one QMP command on the control socket of `vmm run --api PATH` "
                                     "and print the answer as JSON.",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    ctl.lazy_help(None, _ctl_epilog)
    ctl.add_argument("--table", action="store_true", help="aligned tables instead of JSON (query commands)")
    ctl.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                     help="how long to wait for the VM (default 10)")
    ctl.add_argument("path", metavar="PATH", help="the control socket (--api PATH of vmm run)")
    ctl.add_argument("qmp_command", metavar="COMMAND", help="a command, e.g. query-status")
    ctl.add_argument("arguments", nargs="*", metavar="key=value", help="the command's arguments")
    image = sub.add_parser("image", help="build a Linux kernel and initramfs from Debian packages (vmm.image)")
    image.add_argument("--cache", metavar="DIR", help="where to download and build (default ~/.cache/splitvmm/linux, "
                       "with --minimal ~/.cache/splitvmm/linux-minimal)")
    image.add_argument("--minimal", action="store_true",
                       help="build a small kernel from Debian's linux-source instead (vmm.minikernel; "
                       "installs its build dependencies; tens of minutes)")
    image.add_argument("--jobs", type=int, default=2, help="make -j for --minimal (default 2; run under nice -n 19)")
    return p


def _device_help() -> str:
    from devices.kinds import kinds

    return ("TYPE[,key=value...] with id=NAME and process=isolated|inline for every type, "
            "or connect=PATH for a device service (devserver serve --listen PATH); "
            f"types: {', '.join(sorted(kinds()))}, or MODULE:CLASS (your own model)")


def _ctl_epilog() -> str:
    from vmm.qmp.commands import COMMANDS

    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name.ljust(width)}  {c.help}" for name, c in sorted(COMMANDS.items())]
    return "commands:\n" + "\n".join(lines) + \
        "\n\nexit status: 0 done, 1 QMP error, 2 bad arguments, 3 no VM at PATH"


def ctl(args: argparse.Namespace) -> int:
    from vmm.qmp.ctl import ctl as run_ctl

    status, out, err = run_ctl(args.path, args.qmp_command, args.arguments, table=args.table,
                               timeout=args.timeout)
    if out:
        print(out)
    if err:
        print(err, file=sys.stderr)
    return status


def image_command(args: argparse.Namespace) -> int:
    """``vmm image``: print the kernel and initramfs paths (built when needed)."""
    import pathlib

    from vmm import image
    if args.minimal:
        return _minimal_image(args)
    try:
        built = image.build(pathlib.Path(args.cache) if args.cache else None)
    except image.ImageError as e:
        print(f"vmm: image: {e}", file=sys.stderr)
        return outcomes.STATUS_VMM_ERROR
    print(f"kernel  {built.kernel}  (Linux {built.version})")
    print(f"initrd  {built.initrd}  (busybox, modules {' '.join(built.modules)})")
    print(f"run:    vmm run --kernel {built.kernel} --initrd {built.initrd} --memory 512M "
          "--device virtio-blk,path=DISK.img")
    return 0


def _minimal_image(args: argparse.Namespace) -> int:
    import pathlib

    from vmm import image, minikernel
    try:
        built = minikernel.build(pathlib.Path(args.cache) if args.cache else None, jobs=args.jobs)
    except image.ImageError as e:
        print(f"vmm: image: {e}", file=sys.stderr)
        return outcomes.STATUS_VMM_ERROR
    print(f"kernel  {built.vmlinux}  (Linux {built.version}, ELF with the PVH note; bzImage: {built.bzimage})")
    print(f"initrd  {built.initrd}  (busybox; the drivers are built in)")
    print(f"run:    vmm run --kernel {built.vmlinux} --initrd {built.initrd} --memory 256M "
          "--device virtio-blk,path=DISK.img")
    return 0


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupted(signo: int, _frame) -> None:
    raise Interrupted(signo)


# The demo: its devices (the disk's path=, a scratch image of the machine,
# is filled in by run()) and the size of that image.
DEMO_DEVICES = ("virtio-rng,id=rng", "virtio-blk,id=blk,serial=splitvmm-demo,path={disk}",
                "virtio-console,id=console")
DEMO_DISK_SIZE = 16 << 20


def _demo_guest() -> pathlib.Path:
    """Build (or find in the cache) the demo guest image."""
    from vmm import guests

    return guests.demo()


def sandbox_summary(endpoint) -> str:
    """``, sandbox LAYERS`` for a device in its own process, else nothing."""
    sandbox = getattr(endpoint, "sandbox", None)
    return f", {sandbox.describe()}" if sandbox is not None else ""


def summary(machine: Machine, result: outcomes.Outcome, seconds: float) -> str:
    """One line: how the run ended and which process served which device."""
    parts = []
    for owner, endpoint in sorted(machine.endpoints.items()):
        if owner == VMM_OWNER:
            continue
        pid = getattr(endpoint, "pid", None)
        where = f"pid {pid} (own process)" if pid is not None else f"pid {os.getpid()} (the VMM)"
        service = getattr(endpoint, "service_path", None)
        if service is not None:     # pid 0: the socket's listener is not the device (a socket unit)
            from vmm.remote import RemoteEndpoint

            assert isinstance(endpoint, RemoteEndpoint)     # only a service's endpoint has a service_path
            where = f"pid {pid or endpoint.reported_pid} (service at {service})"
        where += sandbox_summary(endpoint)
        failed = getattr(endpoint, "failed", None) or (owner in machine.dispatcher.failed and "failed")
        parts.append(f"{endpoint.name}: {where}{', FAILED' if failed else ''}")
    devices = "; ".join(parts) if parts else "no devices"
    emulate = sys.modules.get("vmm.emulate")        # imported by the first instruction it emulates
    emulated = ", ".join(f"{name} x{n}" for name, n in sorted(emulate.counts.items()) if n) if emulate else ""
    extra = f"; emulated by the VMM: {emulated}" if emulated else ""
    return f"{result} after {seconds:.3f} s; VMM pid {os.getpid()}; {devices}{extra}"


def run(args: argparse.Namespace, forkserver: ForkServer | None = None) -> int:
    if args.kernel is not None:
        if args.guest is not None:
            raise ConfigError("--kernel and --guest exclude each other")
        if args.cmdline:
            raise ConfigError("--cmdline is for --guest; the kernel's command line is --append")
    elif args.initrd is not None or args.append is not None:
        raise ConfigError("--initrd and --append need --kernel")
    elif args.guest is None and (args.device or args.cmdline):
        raise ConfigError("--device and --cmdline need --guest (the demo guest brings its own)")
    taken: set[str] = set()
    specs = _parse_specs(args.device, taken)
    demo = args.guest is None and args.kernel is None
    guest = _demo_guest() if demo else args.guest
    # Started first: it imports the device runtime while the VMM sets up.
    if forkserver is None and (demo or args.serial.kind != "none"
                               or any(spec.placement == "isolated" for spec in specs)):
        forkserver = _start_forkserver()
    try:
        machine = Machine(memory=args.memory, vcpus=args.vcpus, access_timeout=args.access_timeout,
                          lock_timeout=args.lock_timeout, serial=args.serial, cpuid_hide=args.cpuid_hide)
    except BaseException:
        if forkserver is not None:
            forkserver.close()
        raise
    if forkserver is not None:
        machine.remote_options = dataclasses.replace(machine.remote_options, forkserver=forkserver)
    try:
        if demo:
            disk = machine.scratch_image(DEMO_DISK_SIZE, prefix="splitvmm-demo-")
            specs = _parse_specs([text.format(disk=disk) for text in DEMO_DEVICES], taken)
        specs = machine.with_default_serial(specs)      # COM1 last, as run() would add it
        # The plan (or trace) is checked against every device before any starts.
        faults = _fault_setup(args, specs)
        machine.faults.configure(faults.get("plan"), trace=faults["trace"], replay=faults.get("replay"),
                                 devices=faults["devices"])
        if args.kernel is not None:
            append = DEFAULT_APPEND if args.append is None else args.append
            machine.load_linux(args.kernel, args.initrd, append, boot=args.kernel_boot)
        else:
            machine.load_pvh(guest, args.cmdline)
        if forkserver is not None:
            _import_ahead(_AFTER_READY)
        if any(spec.placement == "isolated" for spec in specs):
            from vmm.deferred import import_uncollected
            import_uncollected("vmm.remote.endpoint")      # add_devices would import it now anyway
        # Their processes start up in parallel; they come up in this order.
        machine.add_devices([(spec, None) for spec in specs])
        if args.api is not None:
            machine.serve_api(args.api)
        started = time.monotonic()
        result = machine.run(timeout=args.timeout)
        if machine.console is not None:
            machine.console.restore_terminal()
        print(f"vmm: {summary(machine, result, time.monotonic() - started)}", file=sys.stderr)
        fault_summary = machine.faults.summary()
        if fault_summary:
            print(f"vmm: {fault_summary}", file=sys.stderr)
    finally:
        if machine.console is not None:
            machine.console.restore_terminal()
        # Teardown must finish: a second signal does not cut it short.
        saved = {signo: signal.signal(signo, signal.SIG_IGN) for signo in _STOP_SIGNALS}
        try:
            machine.close()
            if forkserver is not None:
                forkserver.close()
        finally:
            for signo, handler in saved.items():
                signal.signal(signo, handler)
    if result.ending in (outcomes.Ending.POWER_OFF, outcomes.Ending.TEST_EXIT, outcomes.Ending.QUIT):
        log.info("%s", result)
    else:
        log.error("%s", result)
        if result.report:
            log.error("vCPU state:\n%s", result.report)
    return result.status


def _parse_specs(texts: Sequence[str], taken: set[str]) -> list[DeviceSpec]:
    """``--device`` texts parsed (vmm.config, and with it the kinds and
    their models, is imported only for a run that has one)."""
    if not texts:
        return []
    from vmm.config import parse_device_spec

    return [parse_device_spec(text, taken) for text in texts]


def _fault_setup(args: argparse.Namespace, specs: list[DeviceSpec]) -> dict:
    """The plan (or trace to replay) checked against the VM's devices
    before anything starts: one line naming fault and key, status 2."""
    by_name = {spec.name: spec for spec in specs}
    if args.fault_replay is not None:
        if args.faults is not None or args.fault_seed is not None:
            raise ConfigError("--fault-replay replays a trace: it takes no --faults or --fault-seed")
        from devices.faults.table import FaultError
        from devices.faults.trace import read_trace

        try:
            trace = read_trace(args.fault_replay)
        except FaultError as e:
            raise ConfigError(f"--fault-replay: {e}") from None
        unknown = sorted({f["device"] for f in trace.firings} - set(by_name))
        if unknown:
            raise ConfigError(f"--fault-replay {args.fault_replay}: firings of device(s) this VM does not "
                              f"have: {', '.join(unknown)}")
        return {"replay": trace, "trace": args.fault_trace, "devices": list(by_name)}
    if args.faults is None:
        if args.fault_seed is not None:
            raise ConfigError("--fault-seed needs --faults PLAN")
        return {"plan": None, "trace": args.fault_trace, "devices": list(by_name)}
    from devices.faults.plan import load_plan
    from devices.faults.table import FaultError
    from vmm.faults import check_plan, device_points

    try:
        plan = load_plan(args.faults, devices=device_points(by_name), seed=args.fault_seed)
        check_plan(plan, by_name, source=args.faults)
    except FaultError as e:
        raise ConfigError(f"--faults {e}") from None
    return {"plan": plan, "trace": args.fault_trace, "devices": list(by_name)}


#: What the VMM imports once a device process is Ready (each device's
#: share of the fault plan, an empty one without a plan, and its digest).
_AFTER_READY = ("_sha256", "devices.faults.plan")


def _import_ahead(modules: Sequence[str]) -> None:
    """Import ``modules`` in a thread of their own: the main thread is about
    to wait (GIL released) for device processes to be forked and come up
    (~20 ms), and needs these right after.  Leaf modules only, which the
    main thread does not import meanwhile; an import error is left for the
    main thread to meet where it imports them."""
    import importlib
    import threading

    def run() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:
                pass

    threading.Thread(target=run, name="import-ahead", daemon=True).start()


def _start_forkserver() -> ForkServer | None:
    """The fork server the run's device processes come from (None, with a
    warning, when it cannot start: they are exec'd one by one instead)."""
    from vmm.forkserver import ForkServer

    try:
        return ForkServer.start()
    except OSError as e:
        log.warning("cannot start the fork server (%s); device processes are started one by one", e)
        return None


def _usage_errors() -> tuple[type[Exception], ...]:
    """What ends a run with status 2 (bad arguments).  The control
    socket's ApiError only once its module is imported: nothing else
    raises it (the except clause is evaluated only when an error comes)."""
    server = sys.modules.get("vmm.qmp.server")
    return (ConfigError, BootError, GuestMemoryError, ConsoleError, *((server.ApiError,) if server else ()))


def main(argv: Sequence[str] | None = None, forkserver: ForkServer | None = None) -> int:
    """``vmm ARGV``; ``forkserver``: one already started (vmm.entry) for
    ``run`` to take (closed here on every path)."""
    try:
        return _main(argv, forkserver)
    finally:
        if forkserver is not None:
            forkserver.close()      # idempotent: run() may have closed it


def _main(argv: Sequence[str] | None, forkserver: ForkServer | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"vmm: {e}", file=sys.stderr)
        return outcomes.STATUS_USAGE
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                        format="vmm: %(levelname)s: %(message)s" if args.verbose else "vmm: %(message)s")
    if args.command == "ctl":
        return ctl(args)
    saved = {signo: signal.signal(signo, _raise_interrupted) for signo in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if args.command == "image":
            return image_command(args)
        return run(args, forkserver)
    except _usage_errors() as e:
        print(f"vmm: {e}", file=sys.stderr)
        return outcomes.STATUS_USAGE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Interrupted as e:
        return 128 + e.signo
    except VmmError as e:
        print(f"vmm: error: {e}", file=sys.stderr)
        return outcomes.STATUS_VMM_ERROR
    finally:
        for signo, handler in saved.items():
            signal.signal(signo, handler)


if __name__ == "__main__":
    sys.exit(main())
