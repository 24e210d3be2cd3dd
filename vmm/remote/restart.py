"""When a device process is started again (issue 10 §3): the policy of a
spawned device and systemd's start-rate limit.

:class:`RestartPolicy` is ``restart=no|on-failure|always`` with
``restart_delay``, ``restart_timeout`` and the burst limit, with the
meaning systemd gives ``Restart=``, ``RestartSec=``,
``StartLimitBurst=`` and ``StartLimitIntervalSec=``: at most ``burst``
starts within any ``interval`` seconds; a start beyond that is refused and
the device is failed for good.  ``restart_timeout`` bounds how long the
guest's accesses wait for a device that is down: when no new process is
serving within that time of the death, the device is failed as a device
without restart is (its regions reaped, reads all ones, DEVICE_FAILED).

:class:`StartLimiter` counts the starts.
"""

from __future__ import annotations

import collections
import time

from devices.record import record

__all__ = ["RestartPolicy", "StartLimiter", "RESTART_MODES", "parse_policy", "POLICY_KEYS"]

RESTART_MODES = ("no", "on-failure", "always")
#: The ``--device`` keys that make a :class:`RestartPolicy`.
POLICY_KEYS = ("restart", "restart_delay", "restart_timeout", "restart_burst", "restart_interval")


@record
class RestartPolicy:
    """What the VMM does when a device process ends (``restart=`` and its keys)."""

    #: ``no``: a device that ends is failed; ``on-failure``: started again
    #: after a death, a kill, a missed deadline or a protocol error;
    #: ``always``: also after it ended on its own (exit status 0).
    mode: str = "on-failure"
    #: Seconds between the death and the new start (systemd RestartSec=).
    delay: float = 0.0
    #: Longest time accesses wait for the device to serve again (seconds).
    timeout: float = 5.0
    #: At most ``burst`` starts within ``interval`` seconds.
    burst: int = 5
    interval: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in RESTART_MODES:
            raise ValueError(f"restart={self.mode!r} (expected one of {', '.join(RESTART_MODES)})")
        for name in ("delay", "timeout", "interval"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 3600:
                raise ValueError(f"restart_{name} must be a number of seconds in [0, 3600], not {v!r}")
        if type(self.burst) is not int or not 1 <= self.burst <= 1000:
            raise ValueError(f"restart_burst must be an integer in [1, 1000], not {self.burst!r}")

    def restarts(self, clean_exit: bool) -> bool:
        """Whether a device that ended (cleanly, or not) is started again."""
        return self.mode == "always" or (self.mode == "on-failure" and not clean_exit)


def parse_policy(items: dict[str, str]) -> RestartPolicy:
    """A policy from ``--device`` keys (:data:`POLICY_KEYS`); ValueError
    with the reason."""
    kw: dict[str, object] = {}
    if "restart" in items:
        kw["mode"] = items["restart"]
    for key in ("restart_delay", "restart_timeout", "restart_interval"):
        if key in items:
            try:
                kw[key.removeprefix("restart_")] = float(items[key])
            except ValueError:
                raise ValueError(f"{key}={items[key]!r} is not a number of seconds") from None
    if "restart_burst" in items:
        try:
            kw["burst"] = int(items["restart_burst"], 0)
        except ValueError:
            raise ValueError(f"restart_burst={items['restart_burst']!r} is not an integer") from None
    return RestartPolicy(**kw)  # type: ignore[arg-type]


class StartLimiter:
    """systemd's start-rate limit: :meth:`allow` counts a start and says
    whether it is within ``burst`` per ``interval`` seconds."""

    def __init__(self, burst: int, interval: float, clock=time.monotonic):
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._starts: collections.deque[float] = collections.deque()

    def allow(self) -> bool:
        now = self._clock()
        while self._starts and now - self._starts[0] >= self.interval:
            self._starts.popleft()
        if len(self._starts) >= self.burst:
            return False
        self._starts.append(now)
        return True
