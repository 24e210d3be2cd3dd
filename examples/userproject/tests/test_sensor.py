"""The sensor and its driver, tested through the splitvmm pytest plugin."""

import pytest

SENSOR = "sensor:Sensor,id=temp,pio=0x540"
DRIVER = "../guest/driver.c"          # relative to this file

# A glitchy sensor: about one read in four answers all ones.
GLITCHES = {"fault": [{"name": "glitch", "device": "temp", "point": "access", "dir": "read",
                       "probability": 0.25, "action": "ones"}]}


@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_driver_reads_every_sample(splitvmm, build_guest, placement):
    vm = splitvmm(guest=build_guest([DRIVER]), devices=[f"{SENSOR},process={placement}"], cmdline="n=16")
    outcome = vm.run(timeout=120)
    assert outcome.status == 0, outcome.ending
    vm.console.expect(r"sample 15: 20\.150 C")
    vm.console.expect(r"driver: 16 samples, 0 retries, ok")


def test_in_the_background(splitvmm, build_guest):
    vm = splitvmm(guest=build_guest([DRIVER]), cmdline="n=4000")
    vm.add_device("sensor:Sensor", id="temp", pio=0x540)       # the keyword form
    vm.start()
    vm.console.expect(r"sample 10: ")                          # while it runs
    assert vm.qmp("query-status")["status"] == "running"
    assert sorted(d["id"] for d in vm.query_devices()) == ["serial0", "temp"]
    vm.quit()
    assert vm.wait(60).status == 12


@pytest.mark.splitvmm_faults(GLITCHES)
def test_driver_retries_glitches(splitvmm, build_guest, fault_seed):
    """Runs once per seed of --splitvmm-seeds A-B (CI sweeps several): the
    driver must get every sample right whatever the seed, and its count of
    retries is the number of glitches the fault trace says were injected."""
    vm = splitvmm(guest=build_guest([DRIVER]), devices=[SENSOR])
    assert vm.run(timeout=120).status == 0
    m = vm.console.expect(r"driver: 32 samples, (\d+) retries, ok")
    fired = [r for r in vm.faults.trace() if r["type"] == "fire"]
    assert int(m.group(1)) == len(fired)
