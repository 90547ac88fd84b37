"""``train.class_weight`` and ``train.precision``: config -> library values, and what the run logs.

Class weights are resolved from the training split's labels (an ``.npz``'s arrays, or the
labels `tfstack.image_files.FileSplits` knows without decoding an image) and the run's class
names; the run records them as ``class_weight.<class name>`` tags and the
``training/class_weight.json`` artifact. The precision is a Keras dtype policy, set for a
stage's whole execution (`precision`) and on the loaded components (`apply_precision`); the run
records ``precision`` and how many layers compute under each policy (``precision.layers``).
``train.feature_cache*`` give the shared frozen-feature cache (`feature_cache`).
"""

from __future__ import annotations

import sys

from tfstack.pipeline.run_log import RunLog
from tfstack.pipeline.schema import Config

CLASS_WEIGHT_KEY = "train.class_weight"


def class_weights(config: Config, splits, names: list[str] | None) -> dict[int, float] | None:
    """``train.class_weight`` as ``{class index: weight}`` for every class (None: off).

    Raises:
        ConfigError: an unknown class name or index (or a setting the task cannot use).
        DataError: ``balanced`` and a class has no training sample.
    """
    from tfstack.class_weights import resolve_class_weight

    return resolve_class_weight(
        config.train.class_weight,
        splits.y_train,
        names,
        task=config.train.task,
        key=CLASS_WEIGHT_KEY,
    )


def log_class_weights(run: RunLog, weights: dict[int, float] | None, names: list[str]) -> None:
    """Tag ``class_weight.<name>`` per class and log ``training/class_weight.json``."""
    if weights is None or not run.run_id:
        return
    from tfstack.tracking import log_tags

    by_name = {names[index]: weight for index, weight in weights.items()}
    # Tags, not params: params are write-once, and the flattened config already logs the
    # user's own train.class_weight.<key> params, possibly under the class index.
    log_tags(run.run_id, {f"class_weight.{name}": f"{w:.6g}" for name, w in by_name.items()})
    run.json({"setting": _setting(run.config), "weights": by_name}, "training/class_weight.json")


def _setting(config: Config):
    """``train.class_weight`` as given (a plain dict or string), for the artifact."""
    setting = config.train.class_weight
    return dict(setting) if isinstance(setting, dict) else setting


def feature_cache(config: Config):
    """The shared frozen-feature cache ``train.feature_cache*`` names, or None when off."""
    if config.train.feature_cache == "off" or config.train.cache_frozen == "off":
        return None
    from tfstack.feature_cache import FeatureCache, resolve_root

    root = resolve_root(config.train.feature_cache_dir)
    cache = FeatureCache(root, max_bytes=int(config.train.feature_cache_max_gb * 1e9))
    if config.distribute.kind == "multi_worker":
        # Every worker must run the frozen part's collective predict together: they decide
        # hit or miss together, and take no lock (one waiting for it hung the 2-worker test).
        from tfstack.distribute import WorkersFeatureCache, make_strategy

        return WorkersFeatureCache(cache, make_strategy("multi_worker"))
    return cache


def precision(config: Config):
    """The block in which Keras's global dtype policy is ``train.precision`` (then restored)."""
    from tfstack.precision import precision_scope

    return precision_scope(config.train.precision)


def apply_precision(config: Config, bases: list, head) -> None:
    """Put the loaded components under ``train.precision``; the head's outputs stay float32."""
    if config.train.precision == "float32":
        return  # today's behaviour: the files' own policies
    from tfstack.precision import apply_policy

    for base in bases:
        apply_policy(base, config.train.precision)
    apply_policy(head, config.train.precision, float32_outputs=True)


def stacked_under_precision(config: Config, model) -> None:
    """Put the stacked model, itself included, under ``train.precision`` before training.

    The build stage did so already, but the stacked model's own policy is not saved in its
    file (a model reloaded outside the policy's scope is float32 itself, and Keras wraps the
    optimizer for loss scaling only when the model's own policy is mixed_float16); and a model
    handed over by build is made sure of too.
    """
    if config.train.precision == "float32":
        return
    from tfstack import augmentation, preprocessing
    from tfstack.precision import apply_policy

    front = (preprocessing.BLOCK_NAME, augmentation.BLOCK_NAME)
    apply_policy(model, config.train.precision, float32_outputs=True, float32_blocks=front)


def log_precision(run: RunLog, config: Config, model, *, chief: bool) -> None:
    """Warn when the policy is slow here; tag ``precision`` and ``precision.layers``."""
    from tfstack.precision import policy_counts, slow_on_this_machine

    warning = slow_on_this_machine(config.train.precision) if chief else None
    if warning:
        print(f"tfstack: warning: {warning}", file=sys.stderr)
    if not run.run_id:
        return
    from tfstack.tracking import log_tags

    counts = ", ".join(f"{name}: {n}" for name, n in sorted(policy_counts(model).items()))
    log_tags(run.run_id, {"precision": config.train.precision, "precision.layers": counts})
