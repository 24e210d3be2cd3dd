"""``sandbox=`` and ``seccomp=`` on the command line: understood for every
type (like ``id=`` and ``process=``), validated, never passed to the
model."""

from __future__ import annotations

import pytest

from vmm.config import ConfigError, parse_device_spec


def test_defaults_are_strict_and_kill():
    spec = parse_device_spec("echo,pio=0x5000")
    assert (spec.sandbox, spec.seccomp) == ("strict", "kill")


@pytest.mark.parametrize("kind", ["echo,pio=0x5000", "virtio-rng", "serial", "devserver.sandbox.hostile:Hostile"])
def test_every_type_takes_them_and_the_model_never_sees_them(kind):
    spec = parse_device_spec(f"{kind},sandbox=auto,seccomp=trap")
    assert (spec.sandbox, spec.seccomp) == ("auto", "trap")
    assert "sandbox" not in spec.param_dict() and "seccomp" not in spec.param_dict()


@pytest.mark.parametrize("text, message", [
    ("echo,pio=0x5000,sandbox=lax", "sandbox='lax' (expected strict, auto or off)"),
    ("echo,pio=0x5000,seccomp=allow", "seccomp='allow' (expected kill, trap or log)"),
    ("echo,pio=0x5000,process=inline,sandbox=strict", "sandbox= and seccomp= are for process=isolated"),
])
def test_a_bad_value_is_one_clear_error(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_device_spec(text)
