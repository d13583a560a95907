"""Packaging glue that pyproject.toml cannot express on its own.

The recipe scripts and their YAML configs live in the top-level ``recipes/`` folder of the source tree
(so they are easy to find and read), but ship inside the installed package as ``torchft._recipes``:
a non-editable install can still ``tune run`` them, and no generic top-level ``recipes`` package lands
in site-packages.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["torchft", "torchft.*"]) + ["torchft._recipes"],
    package_dir={"torchft._recipes": "recipes"},
    package_data={"torchft._recipes": ["*.py", "configs/*.yaml", "configs/*/*.yaml"], "torchft": ["data/assets/*"]},
)
