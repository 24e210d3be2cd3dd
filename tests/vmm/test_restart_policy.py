"""The restart policy of a device spec and systemd's start-rate limit
(vmm.remote.restart), without a VM."""

from __future__ import annotations

import pytest

from vmm.config import ConfigError, parse_device_spec
from vmm.remote.restart import RestartPolicy, StartLimiter


def test_default_policy_of_a_spawned_device_is_on_failure():
    spec = parse_device_spec("echo,pio=0x1000")
    assert spec.restart == RestartPolicy("on-failure", 0.0, 5.0, 5, 10.0) and spec.state


def test_every_key():
    spec = parse_device_spec("echo,pio=0x1000,restart=always,restart_delay=0.25,restart_timeout=2,"
                             "restart_burst=7,restart_interval=30,state=off")
    assert spec.restart == RestartPolicy("always", 0.25, 2.0, 7, 30.0) and not spec.state
    assert spec.params == (("pio", "0x1000"),)      # none of them reaches the model


@pytest.mark.parametrize("text, words", [
    ("echo,pio=0x1000,restart=sometimes", "restart='sometimes'"),
    ("echo,pio=0x1000,restart_delay=soon", "restart_delay='soon' is not a number"),
    ("echo,pio=0x1000,restart_timeout=-1", "restart_timeout must be"),
    ("echo,pio=0x1000,restart_burst=0", "restart_burst must be"),
    ("echo,pio=0x1000,state=maybe", "state='maybe'"),
    ("echo,pio=0x1000,process=inline,restart=no", "apply only to process=isolated"),
])
def test_bad_values_are_one_clear_error(text, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        parse_device_spec(text)


def test_restarts_by_mode():
    assert not RestartPolicy("no").restarts(clean_exit=False)
    assert RestartPolicy("on-failure").restarts(clean_exit=False)
    assert not RestartPolicy("on-failure").restarts(clean_exit=True)
    assert RestartPolicy("always").restarts(clean_exit=True)


def test_start_limit_is_a_sliding_window():
    now = [0.0]
    lim = StartLimiter(3, 10.0, clock=lambda: now[0])
    for t in (0.0, 1.0, 2.0):
        now[0] = t
        assert lim.allow()
    assert not lim.allow()
    now[0] = 9.9
    assert not lim.allow()
    now[0] = 10.0           # the start at 0 left the window, the others did not
    assert lim.allow() and not lim.allow()
