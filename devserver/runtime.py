"""The life of a device process: handshake, attach, serve, exit.

:class:`DeviceServer` runs on an already-connected control
:class:`ipc.transport.Channel`:

1. handshake: Hello → Welcome, then the configuration messages (device
   config, registry, slots, optional guest memory) until Start, all within
   a deadline; each received descriptor is mapped and closed at once;
2. apply the sandbox (:mod:`devserver.sandbox`; the model's module is
   imported and its host files are opened just before), then build the
   model (:mod:`devices.kinds`) on a :class:`RemoteHost`, let it
   claim its initial regions, answer Ready(pid);
3. serve accesses from the slots on the main thread (through the
   ``access`` and ``process`` fault points once they are armed,
   :mod:`devices.faults.apply`), while a control thread reads the socket
   (Reset, Shutdown, FaultControl: the device's fault engine) and watches
   for the VMM going away (end of stream, or this process re-parented);
   each fault firing goes to the VMM as a FaultFired message;
4. on the way out, release the model's regions and unmap everything.

Exit status: 0 after Shutdown or when the VMM went away, 1 when the device
could not start (the VMM got an Error message), 2 when the VMM broke the
protocol or the handshake did not finish in time.

The same runtime serves one VM session of a device service
(:mod:`devserver.service`), through a few hooks: ``config_filter`` merges
the service's own kind and parameters into the VMM's DeviceConfig (or
refuses it), ``tick`` is called from the handshake waits and the serving
loop (the watchdog's keep-alives), ``stuck_status`` is the exit status when
a handler is stuck; and :meth:`DeviceServer.request_stop` ends a session
from a signal handler.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable

from devices import hostres
from devices.base import Device, Space
from devices.faults.apply import ProcessHooks, attach_engine, serve_access
from devices.faults.engine import FaultEngine, ReplayEngine
from devices.faults.hook import SILENT
from devices.faults.plan import parse_fault
from devices.faults.table import FaultError
from devices.faults.trace import check_record
from devserver import sandbox
from devices.guestmem import GuestRam
from devserver.errors import StartFailed
from devserver.host import RemoteHost
from devserver.interrupts import IrqClient
from devices.kinds import ModelNotFound, resolve
from ipc import Registry
from ipc.registry import take_lock_for_fault
from devices.base import ConsoleFds
from devserver.persist import StateKeeper
from ipc.protocol import (ConnectionClosed, DeviceConfig, Error, FaultControl, FaultFired, FaultReply,
                          Hello, Message, Ready,
                          RemoteProtocolError, Reset, ResetDone, SetConsole, SetMemTable,
                          SetRegistry, SetSlots, SetState, Shutdown, Start, negotiate)
from ipc.state import StateError, StateSegment
from ipc.protocol import IRQ_ANSWERS
from ipc.batch import BATCH_SPACE, BatchError
from ipc.slots import STATUS_ERROR, STATUS_OK, SlotServer, SlotsStopped
from ipc.transport import Channel, ChannelTimeout, close_fds

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_PROTOCOL = 2
#: How long the serving thread may stay inside a handler once the VMM is
#: gone before the process exits anyway.
STUCK_GRACE = 2.0
#: How often the control thread looks at its parent.
PARENT_CHECK = 0.5
_SPACES = (Space.PIO, Space.MMIO, Space.PCI)
_SIZES = frozenset((1, 2, 4, 8))


class DeviceServer:
    """One device process's runtime (see the module docstring)."""

    def __init__(self, channel: Channel, handshake_timeout: float = 10.0,
                 check_parent: bool = True, *,
                 config_filter: Callable[[DeviceConfig], DeviceConfig] | None = None,
                 tick: Callable[[], None] | None = None, wait_slice: float = 1.0,
                 stuck_status: int = EXIT_OK, keep_fds: set[int] | None = None, spare: bool = False,
                 parent_death: bool = False):
        self.channel = channel
        self.handshake_timeout = handshake_timeout
        #: Service mode (devserver.service): turns the VMM's DeviceConfig
        #: into the one to run (the service's own kind and parameters
        #: merged in), or raises StartFailed to refuse it.
        self.config_filter = config_filter
        #: Called from the handshake waits and from the serving loop at
        #: least every ``wait_slice`` seconds while they are healthy (the
        #: service's watchdog keep-alives, devserver.notify).
        self.tick = tick
        self.wait_slice = wait_slice
        #: Exit status when a handler is stuck after the VMM went away (a
        #: service exits non-zero, so its manager restarts it).
        self.stuck_status = stuck_status
        #: Descriptors of the caller's that the sandbox keeps open (a
        #: service session's health pipe).
        self.keep_fds = set(keep_fds or ())
        #: A warm spare: the Hello may take any time (devserver.cli --spare).
        self.spare = spare
        #: The parent is single-threaded and this process dies with it
        #: (a service's session: the sandbox's outer reaper keeps
        #: PR_SET_PDEATHSIG across the uid switch).
        self.parent_death = parent_death
        self.config: DeviceConfig | None = None
        self.registry: Registry | None = None
        self.slots: SlotServer | None = None
        self.memory: mmap.mmap | None = None
        self.mem_table: SetMemTable | None = None
        #: Bounds-checked guest-physical view of self.memory, for the model.
        self.guest_ram: GuestRam | None = None
        self.model: Device | None = None
        self.host: RemoteHost | None = None
        #: Interrupt requests to the VMM (devserver.interrupts).
        self.irq: IrqClient | None = None
        #: The console (SetConsole), kept open for the model until teardown.
        self.console: ConsoleFds | None = None
        #: The state segment (SetState): snapshots stored before answers,
        #: restored from at start (devserver.persist); None without one.
        self.state: StateKeeper | None = None
        #: Accesses served (known once the server has run).
        self.served = 0
        self._model_lock = threading.Lock()
        self._stopping = threading.Event()
        self._served_out = threading.Event()
        self._parent = os.getppid() if check_parent else 0
        self._send_lock = threading.Lock()
        #: The device's fault engine (FaultControl setup; SILENT before).
        self.fault_engine: FaultEngine = SILENT
        self._process_faults = ProcessHooks(take_lock=self._take_registry_lock)
        #: What the sandbox applied (devserver.sandbox).
        self.sandbox = sandbox.Applied()

    # -- the whole life ------------------------------------------------------

    def run(self) -> int:
        try:
            try:
                self._handshake()
            except StartFailed as e:
                log.error("cannot start: %s", e)
                self._send(Error(str(e)[:1000] or "device failed to start"))
                self._drain()
                return EXIT_START_FAILED
            except (RemoteProtocolError, ChannelTimeout, EOFError) as e:
                log.error("handshake with the VMM failed: %s", e)
                return EXIT_PROTOCOL
            control = threading.Thread(target=self._control_loop, name="devserver-control", daemon=True)
            control.start()
            self._serve()
            self._served_out.set()
            control.join(PARENT_CHECK * 4)
            return EXIT_OK
        finally:
            self._teardown()

    def _send(self, msg: Message) -> None:
        with self._send_lock:
            try:
                self.channel.send(msg)
            except OSError as e:
                log.info("cannot send %s to the VMM: %s", msg.TYPE, e)

    def _drain(self, timeout: float = 2.0) -> None:
        """After an Error: take what the VMM still sends until it hangs up
        (or ``timeout``), so it reads the Error before it sees the end of
        the stream (closing with its messages unread would reset the
        connection, which the VMM may see first)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.channel.receive(left)
            except (ChannelTimeout, RemoteProtocolError, OSError):
                return
            if isinstance(msg, ConnectionClosed):
                return
            close_fds(msg.fds())

    # -- handshake -----------------------------------------------------------

    def _receive(self, deadline: float) -> Message:
        while True:
            left = max(0.0, deadline - time.monotonic())
            if self.tick is None:
                msg = self.channel.receive(left)
                break
            try:
                msg = self.channel.receive(min(left, self.wait_slice))
                break
            except ChannelTimeout:
                if time.monotonic() >= deadline:
                    raise
                self.tick()
        if isinstance(msg, ConnectionClosed):
            raise EOFError("the VMM closed the control socket during the handshake")
        return msg

    def _handshake(self) -> None:
        if self.spare:
            self._await_hello()
        deadline = time.monotonic() + self.handshake_timeout
        hello = self._receive(deadline)
        assert isinstance(hello, Hello)  # the protocol allows nothing else first
        welcome = negotiate(hello)
        if welcome is None:
            raise StartFailed(f"no common protocol version (the VMM offers {hello.version})")
        self._send(welcome)
        while True:
            msg = self._receive(deadline)
            if isinstance(msg, Shutdown):
                raise EOFError("the VMM sent shutdown during the handshake")
            if isinstance(msg, Start):
                break
            self._configure(msg)
        self._enter_sandbox()
        self._start_model()
        assert self.slots is not None and self.config is not None
        self._send(Ready(self.sandbox.host_pid, sandbox=tuple(self.sandbox.layers)))
        log.info("ready: %s, owner %d, %d slot(s), polling up to %d ns%s",
                 self.config.kind, self.config.owner, self.slots.nslots, self.slots.poll_ns,
                 " (adaptive)" if self.slots.adaptive else "")

    def _await_hello(self) -> None:
        """A spare: wait until the VMM speaks (or goes away), no deadline."""
        import select
        while not select.select([self.channel.fileno()], [], [], PARENT_CHECK)[0]:
            if self._parent and os.getppid() != self._parent:
                raise EOFError("the VMM went away before it needed this spare")

    def _configure(self, msg: Message) -> None:
        """Apply one configuration message; close its descriptor either way."""
        try:
            if isinstance(msg, DeviceConfig):
                if self.config_filter is not None:
                    msg = self.config_filter(msg)
                self.config = msg
                set_log_name(msg.name)
            elif isinstance(msg, SetRegistry):
                self.registry = Registry.from_fd(msg.fd)
            elif isinstance(msg, SetSlots):
                self.slots = SlotServer.from_fd(msg.fd, poll_ns=msg.poll_ns, adaptive=msg.adaptive,
                                                move=msg.move)
                if self.slots.nslots != msg.nslots:
                    raise StartFailed(f"slot segment has {self.slots.nslots} slots, not {msg.nslots}")
            elif isinstance(msg, SetMemTable):
                self._map_memory(msg)
            elif isinstance(msg, SetConsole):
                out_fd = os.dup(msg.out_fd)
                self.console = ConsoleFds(out_fd, os.dup(msg.in_fd))
            elif isinstance(msg, SetState):
                try:
                    self.state = StateKeeper(StateSegment.attach(msg.fd))
                except StateError as e:
                    raise StartFailed(f"state segment: {e}") from None
        except StartFailed:
            raise
        except Exception as e:
            raise StartFailed(f"{msg.TYPE}: {e}") from e
        finally:
            close_fds(msg.fds())

    def _map_memory(self, msg: SetMemTable) -> None:
        size = os.fstat(msg.fd).st_size
        for r in msg.regions:
            if r.offset + r.size > size:
                raise StartFailed(f"memory region at {r.guest_addr:#x} ends past the memory fd ({size:#x} bytes)")
        self.memory = mmap.mmap(msg.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.mem_table = msg
        self.guest_ram = GuestRam(self.memory, msg.regions)

    def _enter_sandbox(self) -> None:
        """The sandbox (devserver.sandbox), once every descriptor is here
        and before the model is built: its host files are opened first."""
        cfg = self.config
        if cfg is None:
            raise StartFailed("start before device-config")
        try:
            cls = resolve(cfg.kind)
        except ModelNotFound as e:
            raise StartFailed(str(e)) from None
        keep = {self.channel.fileno()} | self.keep_fds
        if self.console is not None:
            keep |= {fd for fd in (self.console.output, self.console.input) if fd >= 0}
        try:
            keep |= hostres.preopen(cls.host_resources(dict(cfg.params)))
        except OSError as e:
            raise StartFailed(f"{cfg.kind}: {e.filename or ''}: {e.strerror}") from None
        try:
            self.sandbox = sandbox.apply(sandbox.SandboxConfig(cfg.sandbox, cfg.seccomp), cfg.kind, cls, keep,
                                         report_sock=self.channel.fileno(),
                                         tid_base=sandbox.tid_base(cfg.owner), parent_death=self.parent_death)
        except sandbox.SandboxError as e:
            raise StartFailed(str(e)) from None
        if self.sandbox.pid_namespace:
            _name_filter.pid = self.sandbox.host_pid
            self._parent = 0    # our parent is the reaper, outside; we die with it (devserver.sandbox.namespaces)
        if self.sandbox.layers:
            log.info("sandbox: %s (%.1f ms, %d rules)", " ".join(self.sandbox.layers),
                     self.sandbox.seconds * 1e3, self.sandbox.rules)
            log.debug("sandbox layers, ms: %s", " ".join(f"{name} {secs * 1e3:.1f}"
                                                         for name, secs in self.sandbox.layer_seconds.items()))

    def _start_model(self) -> None:
        cfg = self.config
        assert cfg is not None and self.registry is not None and self.slots is not None
        if self.slots.nslots < cfg.nvcpus:
            raise StartFailed(f"{self.slots.nslots} slot(s) for {cfg.nvcpus} vCPU(s)")
        self.irq = IrqClient(self._send, self.channel.receive)
        self.host = RemoteHost(self.registry, cfg.owner, console=self.console, irq=self.irq,
                               memory=self.guest_ram, pid=self.sandbox.host_pid)
        self.model = self._build_model()

    def _build_model(self, fresh: bool = False) -> Device:
        cfg, host = self.config, self.host
        assert cfg is not None and host is not None
        try:
            model = resolve(cfg.kind)(host, **cfg.params)
        except ModelNotFound as e:
            raise StartFailed(str(e)) from None
        except Exception as e:      # the model's constructor, whatever it raises
            raise StartFailed(f"{cfg.kind}: {e}") from None
        try:
            if self.state is not None:
                self.state.bring_up(model, fresh=fresh)
            else:
                model.start()
        except Exception as e:
            try:
                model.stop()
            except Exception:
                pass
            if isinstance(e, StartFailed):
                raise
            raise StartFailed(f"{cfg.kind} cannot claim its regions: {e}") from None
        return model

    # -- serving -------------------------------------------------------------

    def _serve(self) -> None:
        slots, lock = self.slots, self._model_lock
        assert slots is not None
        # One call into C per access: the answer to the last request and
        # the wait for the next (SlotServer.answer_next_raw), the request's
        # fields kept in locals (no request object per access).
        answer_next = slots.answer_next_raw
        answered = self.state.answered if self.state is not None else None
        mask64 = 0xFFFF_FFFF_FFFF_FFFF
        tick, wait = self.tick, self.wait_slice
        wait_ns = int(wait * 1e9)
        spaces, nspaces, sizes = _SPACES, len(_SPACES), _SIZES
        acquire, release = lock.acquire, lock.release
        pending = False             # a request is taken and not answered yet
        slot = seq = aseq = value = status = 0
        while True:
            try:
                if pending:
                    r = answer_next(slot, seq, aseq, value, status, wait_ns)
                else:
                    got = slots.next(wait)
                    r = None if got is None else tuple(got)
            except SlotsStopped:
                return
            if tick is not None:
                tick()
            if r is None:
                pending = False
                continue
            pending = True
            slot, seq, space, size, is_write, _, cookie, offset, wvalue, aseq = r
            value, status = 0, STATUS_OK
            if space == BATCH_SPACE:
                status = self._serve_batch(wvalue, aseq)
                continue
            if space >= nspaces or size not in sizes:
                log.error("bad request from the VMM: space %d size %d", space, size)
                status = STATUS_ERROR
                continue
            try:
                acquire()  # (acquire/try/release rather than "with": ~40 ns less per access)
                try:
                    model = self.model
                    if model is None:       # a reset that failed; the process is on its way out
                        raise StartFailed("no model")
                    armed = self.fault_engine.armed
                    if armed and ("access" in armed or "process" in armed):
                        value = serve_access(model, self.fault_engine, spaces, space, cookie, offset,
                                             size, is_write, wvalue, self._process_faults)
                    elif is_write:
                        model.write(spaces[space], cookie, offset, size, wvalue)
                        value = 0
                    else:
                        value = model.read(spaces[space], cookie, offset, size)
                    if type(value) is not int:
                        value = 0
                    if answered is not None:
                        # Before the answer: a death after this store is
                        # answered from the record (ipc.accessseq).
                        answered(model, aseq, value & mask64)
                finally:
                    release()
            except Exception:
                log.exception("%s access at offset %#x failed", spaces[space].name, offset)
                value, status = 0, STATUS_ERROR

    def _serve_batch(self, count: int, aseq: int = 0) -> int:
        """Apply a batch of writes (coalesced MMIO, ipc.batch) in order;
        the status to answer."""
        batch = self.irq.batch if self.irq is not None else None
        try:
            if batch is None:
                raise BatchError("a write batch, but the VMM gave no batch segment")
            writes = batch.read(count)
        except BatchError as e:
            log.error("bad request from the VMM: %s", e)
            return STATUS_ERROR
        try:
            with self._model_lock:
                model = self.model
                assert model is not None
                engine = self.fault_engine
                if "access" in engine.armed or "process" in engine.armed:   # each write is an access event
                    for space, cookie, offset, size, value in writes:
                        serve_access(model, engine, _SPACES, space, cookie, offset, size, True, value,
                                     self._process_faults)
                else:
                    write = model.write
                    for space, cookie, offset, size, value in writes:
                        write(_SPACES[space], cookie, offset, size, value)
                if self.state is not None:      # the batch is one access (ipc.accessseq)
                    self.state.answered(model, aseq, 0)
        except Exception:
            log.exception("a batch of %d writes failed", count)
            return STATUS_ERROR
        return STATUS_OK

    # -- control socket ------------------------------------------------------

    def _control_loop(self) -> None:
        try:
            self._control()
        except Exception:
            log.exception("control thread failed")
        self._stop()

    def _control(self) -> None:
        if self.irq is not None:    # answers to interrupt requests arrive here now
            self.irq.reader = threading.current_thread()
        while not self._stopping.is_set():
            if self._parent and os.getppid() != self._parent:
                log.info("the VMM (pid %d) is gone; exiting", self._parent)
                return
            try:
                msg = self.irq.take_deferred() if self.irq is not None else None
                if msg is None:
                    msg = self.channel.receive(PARENT_CHECK)
            except ChannelTimeout:
                continue
            except RemoteProtocolError as e:
                log.error("the VMM broke the control protocol: %s; exiting", e)
                return
            except OSError as e:
                log.info("control socket: %s; exiting", e)
                return
            if isinstance(msg, ConnectionClosed):
                log.info("the VMM closed the control socket; exiting")
                return
            if isinstance(msg, Shutdown):
                log.info("shutdown")
                return
            if isinstance(msg, IRQ_ANSWERS):
                if self.irq is not None:
                    self.irq.on_answer(msg)
                continue
            if isinstance(msg, Reset):
                self._reset()
            elif isinstance(msg, FaultControl):
                self._fault_control(msg)
            else:  # the protocol lets nothing else through in this state
                log.error("unexpected %s from the VMM", msg.TYPE)
                return

    def _reset(self) -> None:
        with self._model_lock:
            old = self.model
            if old is not None:
                old.stop()
            if self.irq is not None:
                self.irq.close()    # the old model's eventfds; the VMM dropped its routes
            try:
                self.model = self._build_model(fresh=True)
                self.model.attach_faults(self.fault_engine)
            except StartFailed as e:
                self.model = None
                log.error("reset failed: %s", e)
                self._send(Error(f"reset failed: {e}"[:1000]))
                self._stop()
                return
        self._send(ResetDone())

    def request_stop(self) -> None:
        """Ask the server to end without waiting for it (safe in a signal
        handler that runs on the serving thread): the serving loop
        returns, the control thread sees the socket shut."""
        self._stopping.set()
        if self.slots is not None:
            self.slots.stop()
        try:
            self.channel.shutdown()
        except OSError:
            pass

    # -- faults (devices.faults; ipc.protocol "faults" block) -----------------

    def _take_registry_lock(self) -> None:
        assert self.registry is not None
        take_lock_for_fault(self.registry)

    def _fault_record(self, record: dict) -> None:
        """The engine's sink: each record goes to the VMM, which writes the
        trace (a sandboxed process has no filesystem)."""
        self._send(FaultFired(json.dumps(record, separators=(",", ":"), allow_nan=False)))

    def _fault_control(self, msg: FaultControl) -> None:
        try:
            result = self._fault_op(msg.op, json.loads(msg.body))
            reply = FaultReply(msg.seq, True, json.dumps(result, separators=(",", ":")))
        except (FaultError, ValueError, KeyError, TypeError) as e:
            reply = FaultReply(msg.seq, False, (str(e) or type(e).__name__)[:1000])
        if len(reply.body) > 50_000:
            reply = FaultReply(msg.seq, False, "the answer is too large for one message")
        self._send(reply)

    def _fault_op(self, op: str, body: object) -> object:
        cfg, model = self.config, self.model
        assert cfg is not None
        if model is None:
            raise FaultError("no model")
        if not isinstance(body, dict):
            raise FaultError(f"{op}: the body is a JSON object")
        points = type(model).all_fault_points()
        devices = {cfg.name: points}
        if op == "setup":
            seed = body.get("seed", 0)
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
                raise FaultError("setup: seed must be an integer in 0..2**64-1")
            replay = body.get("replay")
            engine: FaultEngine
            if replay is not None:
                if not isinstance(replay, list):
                    raise FaultError("setup: replay must be a list of firings")
                firings = [check_record(r, f"replay #{i + 1}") for i, r in enumerate(replay)]
                engine = ReplayEngine(cfg.name, firings, seed=seed, sink=self._fault_record)
            else:
                faults = body.get("faults", [])
                if not isinstance(faults, list):
                    raise FaultError("setup: faults must be a list")
                parsed = [parse_fault(f, devices=devices, points=points) for f in faults]
                engine = FaultEngine(cfg.name, parsed, seed=seed, points=points, sink=self._fault_record)
            self.fault_engine = engine
            if self.host is not None:
                attach_engine(self.host, engine)
            with self._model_lock:
                if self.model is not None:
                    self.model.attach_faults(engine)
            return {"armed": len(engine.faults())}
        engine = self.fault_engine
        if engine is SILENT:
            raise FaultError("the fault engine is not set up")
        if op == "arm":
            fault = parse_fault(body, devices=devices, points=points, taken=[f.name for f in engine.faults()])
            engine.arm(fault)
            return fault.to_dict()
        if op == "disarm":
            name = body.get("name")
            if not isinstance(name, str):
                raise FaultError("disarm: name must be a string")
            return engine.disarm(name).to_dict()
        return {"faults": [s.to_dict() for s in engine.query()],
                "events": {p: engine.events(p) for p in engine.armed}}

    def _stop(self) -> None:
        """Make the serving thread return; exit hard if it is stuck."""
        self._stopping.set()
        if self.slots is not None:
            self.slots.stop()
        if not self._served_out.wait(STUCK_GRACE):
            log.error("a handler is stuck; exiting without cleaning up")
            logging.shutdown()
            os._exit(self.stuck_status)

    # -- teardown ------------------------------------------------------------

    def _teardown(self) -> None:
        if self.model is not None:
            try:
                with self._model_lock:
                    self.model.stop()
            except Exception as e:
                log.warning("stopping the model: %s", e)
            self.model = None
        if self.irq is not None:
            self.irq.close()
        if self.slots is not None:
            st = self.slots.device_stats()
            self.served = st.served
            log.info("served %d access(es): %d found while polling, %d sleep(s), %.1f ms polling "
                     "(%.1f ms of it in vain), %d poll(s) cut short, %d move(s) off a vCPU's CPU",
                     st.served, st.polled_hits, st.sleeps, st.poll_ns / 1e6, st.poll_wasted_ns / 1e6,
                     st.poll_yields, st.moves)
            self.slots.close()
        if self.registry is not None:
            self.registry.close()
        if self.state is not None:
            self.state.close()
        if self.guest_ram is not None:
            try:
                self.guest_ram.release()
            except BufferError as e:
                log.warning("guest RAM still in use at teardown: %s", e)
        if self.memory is not None:
            try:
                self.memory.close()
            except BufferError as e:
                log.warning("guest RAM mapping still in use: %s", e)
        if self.console is not None:
            close_fds((self.console.output, self.console.input))
        self.channel.close()


class _NameFilter(logging.Filter):
    """Puts the device's ``id=`` into every log record (``%(device)s``)."""

    name_ = "?"
    #: The pid as the VMM sees it (a sandboxed device has another one in
    #: its own pid namespace); 0: the process's own.
    pid = 0

    def filter(self, record: logging.LogRecord) -> bool:
        record.device = self.name_
        if self.pid:
            record.process = self.pid
        return True


_name_filter = _NameFilter()


def set_log_name(name: str) -> None:
    _name_filter.name_ = name


_handler: logging.StreamHandler | None = None


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr, each line naming the device and the process.  The
    handler is made once per interpreter: a device forked by the fork
    server (which configured it before forking) reuses the server's
    instead of copying the pages that making one touches."""
    global _handler
    if _handler is None or _handler.stream is not sys.stderr:
        _handler = logging.StreamHandler()
        _handler.addFilter(_name_filter)
        _handler.setFormatter(logging.Formatter("devserver[%(device)s pid %(process)d] %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [_handler]
    root.setLevel(level)
