"""Fixtures of the Linux tests: the Debian kernel and initramfs, fetched
with apt-get and built once (vmm.image, cached across runs)."""

from __future__ import annotations

import pytest

from vmm import image


@pytest.fixture(scope="session")
def debian_image() -> image.Image:
    """The cloud kernel and our initramfs (download on first use)."""
    assert image.have_apt(), "apt-get is needed to fetch the Debian kernel"
    return image.build()
