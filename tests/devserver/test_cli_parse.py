"""devserver.cli.parse_plain (the fork server's parse of a device's command
line without argparse) against argparse's: the same namespace for every
form it takes, None (argparse decides) for every other."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from devserver import cli


def argparse_parse(argv: list[str]) -> argparse.Namespace | None:
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return cli.parser().parse_args(argv)
        except SystemExit:
            return None


@pytest.mark.parametrize("argv", [
    ["--fd", "3"],
    ["--fd", "3", "--log-level", "WARNING"],
    ["--log-level", "DEBUG", "--fd", "17"],
    ["--fd", "3", "--spare"],
    ["--spare", "--preload", "virtio-blk", "--fd", "3", "--log-level", "ERROR"],
    ["--fd", "3", "--handshake-timeout", "2.5"],
    ["--fd", "3", "--handshake-timeout", "-1"],
])
def test_the_vmms_forms_parse_as_argparse_parses_them(argv):
    plain = cli.parse_plain(argv)
    assert plain is not None
    assert plain == argparse_parse(argv)


@pytest.mark.parametrize("argv", [
    [],                                             # no --fd
    ["--fd"],                                       # no value
    ["--fd", "x"],
    ["--fd", "3", "--log-level", "LOUD"],           # not a choice
    ["--fd", "3", "--fd", "4"],                     # twice: argparse's rule (the last) applies
    ["--fd=3"],
    ["--fd", "3", "--handshake-timeout", "soon"],
    ["--fd", "3", "--preload", "--spare"],
    ["--fd", "3", "--bogus"],
    ["--fd", "3", "extra"],
    ["-h"],
])
def test_anything_else_is_left_to_argparse(argv):
    assert cli.parse_plain(argv) is None


def test_the_defaults_are_the_parsers():
    args = cli.parse_plain(["--fd", "3"])
    assert args is not None
    full = argparse_parse(["--fd", "3"])
    assert vars(args) == vars(full)
