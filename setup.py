"""Thin shim for the package-dir mapping pyproject.toml cannot express on its own.

`kernels/` and `data_pipelines/` are top-level folders in the repository but install as
`emu3_train.kernels` and `emu3_train.data_pipelines` (a top-level `kernels` package would clash
with Hugging Face's `kernels` distribution). Install with `make install`.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["emu3_train", "emu3_train.*"])
packages += ["emu3_train.kernels", "emu3_train.data_pipelines"]

setup(
    packages=packages,
    package_dir={
        "emu3_train.kernels": "kernels",
        "emu3_train.data_pipelines": "data_pipelines",
    },
)
