"""Package discovery, the one thing pyproject.toml cannot express (everything else is there).

The layout keeps plugins/ and model_configs/ at the top of the repository, but they install
inside scalebio's namespace: plugins/ as ``scalebio_plugins`` (never as a top-level package called
``plugins``) and model_configs/ as ``scalebio.model_configs``. Packages below each root are found,
not listed, so a new sub-package ships without editing this file.
"""
from setuptools import find_packages, setup

ROOTS = {"scalebio": "scalebio", "scalebio_plugins": "plugins", "scalebio.model_configs": "model_configs"}

setup(
    package_dir=ROOTS,
    packages=[pkg for name, folder in ROOTS.items()
              for pkg in [name] + [f"{name}.{sub}" for sub in find_packages(folder)]],
)
