"""The Python API (README "Python API"): the demo guest with its devices,
driven from Python -- the same machine ``vmm run`` makes, without the CLI.

    .venv/bin/python examples/python_api/run_demo.py

Prints what it checked, and exits with the status ``vmm run`` would give.
"""

import sys

import vmm
from vmm import guests


def main() -> int:
    guest = guests.demo()                      # built once, then cached
    with vmm.Machine(memory="64M", vcpus=1, serial="capture") as machine:
        disk = machine.scratch_image("16M")    # removed at the end of the with block
        machine.add_device("virtio-rng,id=rng")                         # the --device text...
        machine.add_device("virtio-blk", path=disk, id="blk", serial="splitvmm-demo")   # ...or keywords
        machine.add_device("virtio-console", id="console")
        machine.load(guest)
        machine.start(timeout=120)             # in the background; a COM1 is added for the console
        rng = machine.console.expect(r"16 random bytes from virtio-rng: ([0-9a-f]{32})")
        print(f"the guest read {rng.group(1)} from virtio-rng")
        blk = machine.console.expect(r"verified sectors (\d+)-(\d+), flushed")
        print(f"the guest verified sectors {blk.group(1)}-{blk.group(2)} of {disk}")
        for device in machine.query_devices():                          # QMP, in-process
            print(f"  {device['id']:8} {device['kind']:15} pid {device['pid']}  {device['accesses']} accesses")
        outcome = machine.wait()
        machine.console.expect(r"all checks passed: ok")
        print(f"{outcome.ending.value}: {outcome.detail} (vmm run would exit with {outcome.status})")
        return outcome.status


if __name__ == "__main__":
    sys.exit(main())
