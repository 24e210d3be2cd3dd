"""The VMM process: owns the VM (KVM fds, vCPU threads, guest RAM) and
dispatches every port-I/O and MMIO exit through the shared registry to the
endpoint that owns the address.  Nothing outside this package touches KVM.
"""
