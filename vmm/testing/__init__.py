"""Testing with splitvmm: the pytest plugin (:mod:`vmm.testing.plugin`,
registered as ``splitvmm`` through the ``pytest11`` entry point), what it
reports of each machine (:mod:`vmm.testing.report`) and how it hands a
test's fault plan to a machine (:mod:`vmm.testing.faults`)."""
