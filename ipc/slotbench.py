"""Benchmark of the access slots alone: a Python caller and a Python server
in two processes, no control socket, no device model.

    python -m ipc.slotbench [--quick]          # prints one JSON object

The server (``--serve FD``, started by :func:`measure`) answers every read
with ``offset + 1``; the figures are the median round trip of one
``SlotCaller.call`` with the server polling (adaptive window up to
``poll_ns``) and with it sleeping on the futex after every request, plus
the server's spin cost from its published counters.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from ipc.slots import (DEFAULT_POLL_NS, SlotCaller, SlotServer, SlotsStopped, STATUS_OK)


def serve(fd: int, poll_ns: int, adaptive: bool, move: bool = False) -> None:
    """The child: answer reads with ``offset + 1`` until told to stop."""
    server = SlotServer.from_fd(fd, poll_ns=poll_ns, adaptive=adaptive, move=move)
    os.close(fd)
    parent = os.getppid()
    try:
        while True:
            req = server.next(0.2)
            if req is None:
                if os.getppid() != parent:
                    return
                continue
            if req.offset == 0xDEAD:        # the caller says goodbye
                server.complete(req, 0, STATUS_OK)
                return
            server.complete(req, 0 if req.is_write else req.offset + 1, STATUS_OK)
    except SlotsStopped:
        pass
    finally:
        server.close()


def spawn_server(caller: SlotCaller, poll_ns: int, adaptive: bool = True,
                 move: bool = False) -> subprocess.Popen:
    """Start ``serve`` in a child process on ``caller``'s segment."""
    if caller.fd is None:
        raise ValueError("the slot segment is closed")
    return subprocess.Popen(
        [sys.executable, "-m", "ipc.slotbench", "--serve", str(caller.fd),
         "--poll-ns", str(poll_ns)] + ([] if adaptive else ["--fixed"]) + (["--move"] if move else []),
        pass_fds=[caller.fd], stdin=subprocess.DEVNULL)


def stop_server(caller: SlotCaller, proc: subprocess.Popen) -> None:
    try:
        caller.call(0, 0, 0, 0xDEAD, 4, False, 0, timeout=2.0)
    except Exception:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc (seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _round(caller: SlotCaller, n: int) -> float:
    call = caller.call
    t = time.perf_counter()
    for i in range(n):
        call(0, 0, 0, i & 0xFF, 4, False, 0, 1.0)
    return (time.perf_counter() - t) / n * 1e6


def measure(poll_ns: int, n: int, rounds: int, adaptive: bool = True,
            spin_ns: int | None = None, move: bool = False) -> dict:
    """Median round trip (us) of ``rounds`` x ``n`` calls against a fresh
    server, plus the server's CPU cost."""
    caller = SlotCaller.create(1)
    if spin_ns is not None:
        caller.spin_ns = spin_ns
    proc = spawn_server(caller, poll_ns, adaptive, move)
    try:
        assert caller.call(0, 0, 0, 41, 4, False, 0, 5.0) == 42
        _round(caller, max(100, n // 10))           # warm up, let the window grow
        cpu0, wall0, dev0 = _cpu_seconds(proc.pid), time.perf_counter(), caller.device_stats()
        samples = [_round(caller, n) for _ in range(rounds)]
        cpu1, wall1, dev1 = _cpu_seconds(proc.pid), time.perf_counter(), caller.device_stats()
        served = max(1, dev1.served - dev0.served)
        return {
            "poll_ns": poll_ns,
            "adaptive": adaptive,
            "move": move,
            "round_trip_us": round(statistics.median(samples), 2),
            "round_trip_us_min": round(min(samples), 2),
            "device_cpu_fraction": round((cpu1 - cpu0) / (wall1 - wall0), 3),
            "device_poll_us_per_request": round((dev1.poll_ns - dev0.poll_ns) / served / 1e3, 2),
            "device_poll_hit_ratio": round((dev1.polled_hits - dev0.polled_hits) / served, 3),
            "device_sleeps_per_request": round((dev1.sleeps - dev0.sleeps) / served, 3),
            "device_window_ns": dev1.window_ns,
            "device_moves": dev1.moves - dev0.moves,
            "caller_yields": caller.stats().yields,
        }
    finally:
        stop_server(caller, proc)
        caller.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--serve", type=int, metavar="FD", help=argparse.SUPPRESS)
    ap.add_argument("--poll-ns", type=int, default=DEFAULT_POLL_NS)
    ap.add_argument("--fixed", action="store_true", help="fixed (not adaptive) poll window")
    ap.add_argument("--move", action="store_true", help="the server moves off the caller's CPU")
    args = ap.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.poll_ns, not args.fixed, args.move)
        return 0
    n, rounds = (500, 3) if args.quick else (5000, 5)
    result: dict[str, Any] = {
        "what": "Python SlotCaller.call <-> Python SlotServer in another process, 4-byte read",
        "polling": measure(args.poll_ns, n, rounds, not args.fixed, move=args.move),
        "no_polling": measure(0, n // 5, rounds),
    }
    result["ratio_sleep_over_poll"] = round(
        result["no_polling"]["round_trip_us"] / result["polling"]["round_trip_us"], 2)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
