"""Build script. Metadata, dependencies and options live in setup.cfg; this file adds only what
setup.cfg cannot express: the repository's top-level ``configs/`` directory ships inside the wheel as
``veca_ssl/configs/`` (package ``veca_ssl.configs``, YAML files as package data), next to the
auto-discovered packages. ``veca_ssl.CONFIG_DIR`` finds it there in an installed wheel and at the
repository root in a checkout or an editable install."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["veca_ssl", "veca_ssl.*", "eval", "eval.*", "launchers", "launchers.*"])
    + ["veca_ssl.configs"],
    package_dir={"veca_ssl.configs": "configs"},
    # every experiment, model preset and eval config, one directory level deep (configs/models/…)
    package_data={"veca_ssl.configs": ["*.yaml", "*/*.yaml"]},
)
