"""The fork server: one process that has imported the device runtime once
and forks device processes on request from the VMM (issue 15 §1-2).

    python -m devserver.forkserver --fd N

Starting a device with ``python -m devserver`` costs an interpreter and
~130 ms of imports each time (``python -X importtime -m devserver``), and
every device process holds its own copy of what it imported (~13 MB of
Pss).  The fork server pays that once: it imports the runtime, every
registered device model and the sandbox's policy modules, then forks one
child per request (a request that comes while it still imports waits
until all is imported: a device forked earlier would import its model
itself, into pages of its own, and keep a copy of every page the server
writes while it goes on importing -- ~1 MB a device in the demo, for
~20 ms of models, most of it virtio-blk's, which that device's child would
spend importing anyway).  A child shares those pages copy-on-write with
the server and with its siblings, and is running device code a few
milliseconds after the request.

The VMM starts it with ``posix_spawn`` (an exec, so it holds nothing of the
VMM's: no guest RAM, no descriptor but its socket, fd N; the ``vmm``
command does so before its own imports, :mod:`vmm.entry`) and talks to it
over that ``AF_UNIX SOCK_SEQPACKET`` socket (:mod:`vmm.forkserver`):

- request: JSON ``{"argv": [...], "env": {...}}`` (the ``devserver``
  command line after the program name, ``--fd`` included; the
  environment, optional: the VMM's as it is at the request, with a
  ``MODULE:CLASS`` model's directory in front of PYTHONPATH, which the
  child also puts on ``sys.path``) with two descriptors, the device's
  end of its control socket and where its stderr goes;
- reply: ``{"pid": PID}`` or ``{"error": TEXT}``, in request order;
- event: ``{"exit": PID, "status": WAIT_STATUS}`` once a child has ended
  (the server is the children's parent, so it reaps them and passes the
  status on).

The sandbox is not applied here: the child runs the same ``devserver``
main as an exec'd device process, so it applies every layer
(:mod:`devserver.sandbox`: user namespace, namespaces, descriptors,
capabilities, Landlock, seccomp) itself, after the handshake, exactly as
before.  What the child keeps of the server is the server's imported
modules and nothing else: before the device's code runs it has its own
session, /dev/null as stdin and stdout, the given stderr, the control
socket as fd 3, and every other descriptor (the server's socket, its
pidfds of the other devices, the other requests' descriptors, which the
server has closed before it forks again) closed.  The server runs one
thread, so the fork copies no lock held by another thread.

One thing a fork does share: the address-space layout.  Forked devices
have the server's (and so each other's) library and heap addresses,
where exec'd ones each had their own randomisation (Android's zygote
has the same trade-off); the VMM is exec'd on its own and shares
nothing of it.  A device that a guest has compromised learns where its
siblings' code is, not a way to reach them: the other layers stand.

It leaves when the VMM closes its socket (or dies: ``PR_SET_PDEATHSIG``);
its children are the devices' processes and notice the VMM's end on their
own control sockets, as exec'd ones do.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import select
import signal
import socket
import sys

#: The descriptor a forked device finds its control socket on.
CHANNEL_FD = 3
#: Largest request (JSON) accepted.
MAX_REQUEST = 64 * 1024


def preload() -> None:
    """Import what every device process imports, once: the runtime, the
    command line, the sandbox's preload layer, every registered model and
    its sandbox policy (requests wait meanwhile: module docstring)."""
    import devserver.cli  # noqa: F401  (the runtime, ipc, the sandbox)
    from devices import kinds
    from devserver.sandbox import preload as sandbox_preload
    from devserver.runtime import configure_logging
    from devserver.sandbox.policy import kind_rules

    sandbox_preload.apply()
    configure_logging()     # as each device does first (devserver.cli.run): made once, here
    for kind in kinds.kinds():
        try:
            kind_rules(kind, kinds.resolve(kind))
        except Exception as e:  # a model that fails to import fails in its device, with its own error
            print(f"devserver.forkserver: cannot preload {kind}: {e}", file=sys.stderr)


class Server:
    """The request loop: one socket to the VMM, one pidfd per child."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        #: pidfd -> pid of each child not yet reaped.
        self.children: dict[int, int] = {}

    def run(self) -> int:
        while True:
            try:
                events = self.poller.poll()
            except InterruptedError:
                continue
            for fd, _ev in events:
                if fd == self.sock.fileno():
                    if not self._request():
                        return 0
                elif fd in self.children:
                    self._reap(fd)

    def _request(self) -> bool:
        """One request; False when the VMM has gone."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_REQUEST, 2)
        except InterruptedError:
            return True
        except OSError:
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            reply = self._fork(data, fds)
        finally:
            for fd in fds:
                os.close(fd)
        return self._send(reply)

    def _fork(self, data: bytes, fds: list[int]) -> dict:
        try:
            request = json.loads(data)
            argv = request["argv"]
            if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
                raise ValueError("argv is not a list of strings")
            env = request.get("env")
            if env is not None and not (isinstance(env, dict)
                                        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
                raise ValueError("env is not an object of strings")
        except (ValueError, KeyError, TypeError) as e:
            return {"error": f"bad request: {e}"}
        if len(fds) != 2:
            return {"error": f"a request carries 2 descriptors, not {len(fds)}"}
        argv = _with_fd(argv, CHANNEL_FD)
        args = _parse(argv)
        if env is not None and env == _ENVIRON:
            env = None      # as it is here: nothing for the child to rewrite
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()         # the child's collections skip what is shared (a no-op once all is frozen)
        try:
            pid = os.fork()
        except OSError as e:
            return {"error": f"fork: {e}"}
        if pid == 0:
            _child(self.sock, argv, args, env, fds[0], fds[1])     # never returns
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:    # cannot happen for our own unreaped child; say so if it does
            return {"error": f"pidfd_open({pid}): {e}"}
        self.children[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)
        return {"pid": pid}

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        self._send({"exit": pid, "status": status})

    def _send(self, msg: dict) -> bool:
        try:
            self.sock.send(_encode(msg))
        except OSError:
            return False
        return True


def _encode(msg: dict) -> bytes:
    """``msg`` as JSON; the two messages of every device (its pid, its
    exit) without the encoder's Python code, whose objects the server would
    otherwise write anew between two forks (see :func:`_parse`)."""
    if msg.keys() == {"pid"}:
        return b'{"pid": %d}' % msg["pid"]
    if msg.keys() == {"exit", "status"}:
        return b'{"exit": %d, "status": %d}' % (msg["exit"], msg["status"])
    return json.dumps(msg).encode()


def _parse(argv: list[str]) -> argparse.Namespace | None:
    """The device's command line, parsed here before the fork: parsing in
    each child cost ~0.3 MB of its private memory (argparse's and
    gettext's code and objects, copied page by page as they ran; issue 15
    §2), here it costs the server once.  None when it does not parse (or
    is not a device's: ``serve``): the child parses it again and says why
    on its own stderr."""
    global _parser
    from devserver import cli
    if argv[:1] == ["serve"]:
        return None
    args = cli.parse_plain(argv)
    if args is not None:
        return args
    if _parser is None:
        _parser = cli.parser()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return _parser.parse_args(argv)
    except SystemExit:
        return None


_parser: argparse.ArgumentParser | None = None
#: The server's environment, once: a request's (the VMM's at the request)
#: is compared with it (``dict(os.environ)`` would decode every variable
#: anew for each request).
_ENVIRON: dict[str, str] = dict(os.environ)


def _child(server_sock: socket.socket, argv: list[str], args: argparse.Namespace | None,
           env: dict[str, str] | None, channel: int, stderr: int) -> None:
    """In the forked child: the device's descriptors in place, everything
    of the server's closed, then the ``devserver`` main (``args``: its
    command line, parsed already); never returns."""
    code = 1
    try:
        server_sock.detach()        # closed below with the rest; no object may close it again
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(stderr, 2)
        os.dup2(channel, CHANNEL_FD)    # inheritable (dup2's default), as an exec'd device's is
        os.closerange(CHANNEL_FD + 1, _fd_limit())
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        gc.enable()         # for what the device allocates; the server's objects stay frozen
        if env is not None:
            _set_environment(env)
        from devserver import cli
        code = cli.run(args) if args is not None else cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        try:
            import logging
            logging.shutdown()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def _set_environment(env: dict[str, str]) -> None:
    """``env`` as this process's environment; PYTHONPATH entries it adds
    go on ``sys.path`` where the interpreter would have put them (after
    the first entry, the directory of ``-m``)."""
    before = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    os.environ.clear()
    os.environ.update(env)
    added = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in before and p not in sys.path]
    sys.path[1:1] = added


def _with_fd(argv: list[str], fd: int) -> list[str]:
    """``argv`` with its ``--fd`` value replaced by ``fd``."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--fd":
            out[i + 1] = str(fd)
            return out
    return [*out, "--fd", str(fd)]


def _fd_limit() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 65536


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devserver.forkserver",
                                 description="Fork splitvmm device processes on request from the VMM.")
    ap.add_argument("--fd", type=int, required=True, metavar="N",
                    help="inherited AF_UNIX SOCK_SEQPACKET socket connected to the VMM")
    args = ap.parse_args(argv)
    if args.fd > 2:     # posix_spawn (vmm.forkserver) leaves what its caller left inheritable: only the socket stays
        os.closerange(3, args.fd)
        os.closerange(args.fd + 1, _fd_limit())
    from devserver.sandbox import _sys
    _sys.set_parent_death_signal(signal.SIGKILL)
    try:
        sock = socket.socket(fileno=args.fd)
    except OSError as e:
        print(f"devserver.forkserver: --fd {args.fd}: {e}", file=sys.stderr)
        return 2
    if os.getppid() == 1:
        return 0        # the VMM died before the death signal was armed
    # What the children share stays shared: no collection runs here while
    # importing, and what was imported is moved out of the collector's
    # reach (gc.freeze) -- a collection in a child would otherwise write
    # to every object's header and so copy every page of them.  No
    # collection before the freeze either (as the gc docs advise): the
    # holes it would free are where a child's first objects would go,
    # copying a page of the server's for each.
    gc.disable()
    server = Server(sock)
    preload()
    gc.freeze()
    code = server.run()
    sys.stderr.flush()
    os._exit(code)      # nothing to finalize: skip tearing down every module imported


if __name__ == "__main__":
    sys.exit(main())
