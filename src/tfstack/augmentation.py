"""Data augmentation as seeded Keras preprocessing layers inside the stacked model.

The block is a nested ``keras.Sequential`` named ``augment``, placed after the preprocessing and
before the first component (`tfstack.stacking.build_stacked`'s ``front``), as in the Keras
transfer-learning guide: a frozen base sees augmented inputs. Keras's ``Random*`` layers
transform only when called with ``training=True`` (``fit``); in ``predict``, ``evaluate`` and a
served model they pass their input through (``RandomCrop`` center-crops to its size instead).
They are builtins, saved with the model and reloaded with ``safe_mode=True``.

Being inside the model, not in the ``tf.data`` pipeline, they run after any cache, so each
epoch sees new transformations (tensorflow#47755) — and a phase with augmentation in front of a
frozen base cannot cache the base's outputs (`tfstack.frozen_features.split_frozen` says why).

Seeds: layer ``i`` gets ``seed + i``, so one run seed gives the same transformations in every
run, and two layers of one kind do not draw the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import keras

from tfstack.errors import ShapeError
from tfstack.shapes import TensorSpec
from tfstack.vocabulary import augment_layer_problem

logger = logging.getLogger(__name__)

BLOCK_NAME = "augment"


def _snake(class_name: str) -> str:
    """``RandomFlip`` -> ``random_flip``."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in class_name).lstrip("_")


def build_augmentation(
    layers: Sequence[dict],
    input_spec: TensorSpec,
    *,
    seed: int,
    key: str = "augment.layers",
) -> keras.Model | None:
    """The augmentation block, or None for an empty list.

    Args:
        layers: entries ``{class_name: RandomFlip, config: {mode: horizontal}}`` (the layers of
            `tfstack.vocabulary.AUGMENT_LAYERS`, with their parameters).
        input_spec: what the block receives (the preprocessing's output, or the model input).
        seed: the run's seed; layer ``i`` is seeded with ``seed + i``.
        key: the config key of the list, for messages.

    Returns:
        A nested ``keras.Sequential`` named ``augment``, or None.

    Raises:
        ShapeError: an unknown layer or parameter (naming ``augment.layers[i]`` and the valid
            names), or parameters Keras refuses.

    Example:
        >>> from tfstack.augmentation import build_augmentation
        >>> from tfstack.shapes import TensorSpec
        >>> block = build_augmentation(
        ...     [{"class_name": "RandomFlip", "config": {"mode": "horizontal"}}],
        ...     TensorSpec((None, 8, 8, 3), "float32"),
        ...     seed=42,
        ... )
        >>> [(layer.name, layer.seed) for layer in block.layers]
        [('augment_0_random_flip', 42)]
    """
    problem = augment_layer_problem(list(layers), key=key)
    if problem:
        raise ShapeError(problem)
    if not layers:
        return None
    built = []
    for index, entry in enumerate(layers):
        name = entry["class_name"]
        config = dict(entry.get("config") or {})
        try:
            layer = getattr(keras.layers, name)(
                **config, seed=seed + index, name=f"{BLOCK_NAME}_{index}_{_snake(name)}"
            )
        # Keras raises NotImplementedError for an unknown fill_mode.
        except (TypeError, ValueError, NotImplementedError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ShapeError(
                f"{key}[{index}]: {name}({config}) is refused by Keras: {first}"
            ) from err
        if "value_range" in layer.get_config() and "value_range" not in config:
            # Keras's default (0, 255) is wrong after a rescaling to [0, 1]: a brightness
            # delta of factor * 255 would wash every image out, without an error.
            logger.warning(
                "%s[%d] %s uses Keras's default value_range %s; it receives the preprocessed "
                "input, so set %s[%d].config.value_range to its range (e.g. [0, 1] after "
                "preprocess=rescale).",
                key,
                index,
                name,
                list(layer.get_config()["value_range"]),
                key,
                index,
            )
        built.append(layer)
    inputs = keras.Input(shape=tuple(input_spec.shape[1:]), dtype=input_spec.dtype)
    try:
        block = keras.Sequential([inputs, *built], name=BLOCK_NAME)
    except (TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise ShapeError(
            f"{key} cannot take inputs of shape {input_spec.shape}: {first}. Augmentation "
            "layers take images (batch, height, width, channels)."
        ) from err
    logger.info("Augmentation: %s", [f"{layer.name} (seed {layer.seed})" for layer in built])
    return block


__all__ = ["build_augmentation"]
