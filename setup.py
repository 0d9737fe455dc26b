"""Regenerates the protobuf modules whenever the package is built, so a wheel or an install from a
clean checkout never needs generated code in git."""

import pathlib
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        sys.path.insert(0, str(pathlib.Path(__file__).parent / "scripts"))
        from gen_protos import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
