"""tfstack's OmegaConf resolver ``tfstack_dep``, registered wherever Hydra scans its plugins.

``dvc exp run`` composes ``params.yaml`` from ``conf/`` with Hydra in DVC's own process, after
loading Hydra's plugins (every module under the ``hydra_plugins`` namespace is imported). A
resolver registered on import therefore resolves there too, as it does in ``tfstack run`` and
``tfstack params``. ``conf/config.yaml``'s ``dvc_deps`` node uses it to turn each configured
input (the data, each component, a weights file) into a path that ``dvc.yaml`` lists as a
dependency, so replacing one of the user's files in place re-runs the stages that read it.

A value that is not a file (``keras_applications:NAME``, ``weights: imagenet`` or null) becomes
``params.yaml``, a dependency every stage already has through its params. This module imports
nothing but OmegaConf and tfstack's TF-free vocabulary, so DVC's composition stays fast.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from tfstack.vocabulary import APPLICATIONS_PREFIX, NAMED_WEIGHTS

RESOLVER = "tfstack_dep"
# What stands for "no file": DVC hashes it like any dependency, and it changes only with params.
NOT_A_FILE = "params.yaml"


def dvc_dep(value: object) -> str:
    """The file DVC should hash for a configured input: the path itself, or ``params.yaml``."""
    if value is None:
        return NOT_A_FILE
    text = str(value)
    if not text or text.startswith(APPLICATIONS_PREFIX) or text == NAMED_WEIGHTS:
        return NOT_A_FILE
    return text


def register() -> None:
    """Register ``tfstack_dep`` once per process (Hydra may import this module again)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, dvc_dep)


register()
