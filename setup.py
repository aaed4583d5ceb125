"""Packaging for bgrid: the library, the ``bgrid`` command and the ``twistd bgrid`` plugin."""

from setuptools import find_packages, setup

setup(
    name="bgrid",
    version="0.1.0",
    description="Remote execution service for Bazel and other REAPI clients, on Twisted",
    python_requires=">=3.11",
    packages=find_packages(include=["bgrid", "bgrid.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/bgrid_plugin.py"]},
    install_requires=[
        "Twisted>=24.7",
        "grpcio>=1.85.1",
        "grpcio-health-checking>=1.85.1",
        "grpcio-reflection>=1.85.1",
        # The generated code in bgrid/_protos checks for protobuf 7.35.1 or newer within 7.x.
        "protobuf>=7.35.1,<8",
        "googleapis-common-protos>=1.63",
        "lmdb>=1.4",
        "zope.interface>=6.0",
    ],
    extras_require={
        # grpcio-tools regenerates bgrid/_protos; grpcio-status reads the error details
        # of responses in the tests.
        "dev": ["grpcio-tools>=1.85.1", "grpcio-status>=1.85.1"],
    },
    entry_points={"console_scripts": ["bgrid = bgrid.cli.main:main"]},
)
