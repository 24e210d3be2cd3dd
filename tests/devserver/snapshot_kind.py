"""TEST-ONLY: a model that keeps its snapshot in a file, standing in for the
state segment (issue 10 §2, not this module's) so a device *process* can be
killed and a new one restored in tests.

``--device tests.devserver.snapshot_kind:FileKept,inner=KIND,state=PATH[,...]``
builds ``inner`` (a kind or ``MODULE:CLASS``) with the other parameters,
writes ``inner.snapshot()`` to ``PATH`` (msgpack, replaced atomically)
after each access it serves, and, at start, when ``PATH`` exists, resumes
``inner`` from it (:func:`devices.base.resume`: restore, start on what the
VMM kept, release the rest) instead of a fresh start.
"""

from __future__ import annotations

import os

import msgpack

from devices.base import BadParameter, Device, DeviceHost, Space, Window, resume
from devices.kinds import resolve


class FileKept(Device):
    kind = "file-kept"

    @classmethod
    def windows(cls, params: dict[str, str]) -> list[Window]:
        """The inner model's (vmm.windows)."""
        if "inner" not in params:
            return []
        return resolve(params["inner"]).windows({k: v for k, v in params.items() if k not in ("inner", "state")})

    def __init__(self, host: DeviceHost, **params: str):
        inner = params.pop("inner", None)
        path = params.pop("state", None)
        if inner is None or path is None:
            raise BadParameter("file-kept: inner=KIND and state=PATH are required")
        self.path = path
        self.inner = resolve(inner)(host, **params)
        super().__init__(host)
        #: Stale regions released at the last resume (None: started fresh).
        self.released: int | None = None

    def start(self) -> None:
        try:
            with open(self.path, "rb") as f:
                state = msgpack.unpackb(f.read(), raw=False)
        except FileNotFoundError:
            self.inner.start()
            self._keep()
            return
        self.released = resume(self.inner, state)

    def stop(self) -> None:
        self.inner.stop()

    def _keep(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(msgpack.packb(self.inner.snapshot(), use_bin_type=True))
        os.replace(tmp, self.path)

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        value = self.inner.read(space, cookie, offset, size)
        self._keep()
        return value

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        self.inner.write(space, cookie, offset, size, value)
        self._keep()
