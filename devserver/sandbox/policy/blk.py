"""virtio-blk: I/O on its image (``os.preadv``/``pwritev`` become
``preadv2``/``pwritev2`` in Python 3.11 with glibc) and flushes."""

SYSCALLS = ("pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2", "fdatasync", "fsync")
