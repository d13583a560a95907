"""Packaging glue that pyproject.toml cannot express on its own.

The recipe scripts and their YAML configs live in the top-level ``recipes/`` folder of the source tree
(so they are easy to find and read), but ship inside the installed package as ``torchft._recipes``:
a non-editable install can still ``tune run`` them, and no generic top-level ``recipes`` package lands
in site-packages.
"""
from pathlib import Path

from setuptools import find_packages, setup

# Folders that hold only data (YAML configs, the quickstart assets) are listed as packages too: setuptools
# ships a folder's files only through the package that names it, and warns about any folder left unnamed.
CONFIG_PACKAGES = ["torchft._recipes.configs"] + [
    f"torchft._recipes.configs.{folder.name}"
    for folder in sorted((Path(__file__).parent / "recipes" / "configs").iterdir()) if folder.is_dir()
]

setup(
    packages=find_packages(include=["torchft", "torchft.*"]) + ["torchft._recipes", "torchft.data.assets",
                                                                 *CONFIG_PACKAGES],
    package_dir={"torchft._recipes": "recipes"},
    package_data={"torchft._recipes": ["*.py"], "torchft.data.assets": ["*"],
                  **{name: ["*.yaml"] for name in CONFIG_PACKAGES}},
)
