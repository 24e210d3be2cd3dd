"""virtio-rng: entropy for the guest."""

SYSCALLS = ("getrandom",)
