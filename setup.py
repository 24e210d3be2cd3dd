"""Hands cffi's build scripts to setuptools.

Every ``<package>/_*_build.py`` defines an ``ffibuilder`` (cffi API mode);
``pip install`` compiles each into that package's extension module.
"""
import glob

from setuptools import setup

setup(cffi_modules=[f"{path}:ffibuilder" for path in sorted(glob.glob("*/_*_build.py"))])
