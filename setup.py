"""Hands cffi's build scripts to setuptools, and links the package's programs.

Every ``<package>/_*_build.py`` defines an ``ffibuilder`` (cffi API mode);
``pip install`` compiles each into that package's extension module.
:data:`PROGRAMS` are small static executables the package execs (next to
their source, as the extension modules are in an editable install).
"""
import glob
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

#: (package, program, its C source, libraries): linked static-pie, so that
#: they run in a mount namespace without the host's dynamic loader.
PROGRAMS = [
    ("devserver", "_reaper", "devserver/_reaper.c", ["seccomp"]),   # devserver/sandbox/namespaces.py
]


class build_ext_and_programs(build_ext):
    def run(self):
        super().run()
        for package, name, source, libraries in PROGRAMS:
            objects = self.compiler.compile([source], output_dir=self.build_temp,
                                            extra_postargs=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fPIE"])
            out_dir = os.path.join(self.build_lib, package)
            self.compiler.link_executable(objects, name, output_dir=out_dir, libraries=libraries,
                                          extra_postargs=["-static-pie"])
            if self.inplace:
                self.copy_file(os.path.join(out_dir, name), os.path.join(package, name))

    def get_outputs(self):
        extra = [os.path.join(self.build_lib, package, name) for package, name, _, _ in PROGRAMS]
        return super().get_outputs() + ([] if self.inplace else extra)


setup(cmdclass={"build_ext": build_ext_and_programs},
      cffi_modules=[f"{path}:ffibuilder" for path in sorted(glob.glob("*/_*_build.py"))])
