"""Input preprocessing as built-in, serializable Keras layers inside the stacked model.

The stacked model then takes raw pixels, whether it is trained, evaluated, saved or served: the
block is a nested ``keras.Sequential`` (or functional model) named ``preprocess``, in front of
the first component (`tfstack.stacking.build_stacked`'s ``front``). Every layer is a Keras
builtin (no Lambda, no custom class), so the saved model reloads with ``safe_mode=True`` and
tfstack's trust check finds no code in it.

Kinds (`tfstack.vocabulary.PREPROCESS_KINDS`):

- ``none``: nothing (with ``resize``, only the resizing);
- ``rescale``: ``x * scale + offset`` (`keras.layers.Rescaling`), e.g. ``scale=1/255``;
- ``normalize``: ``(x - mean) / std`` per channel, the mean and std adapted on the training split
  (`keras.layers.Normalization.adapt`, batch by batch over a ``tf.data`` dataset, so streamed
  data works too);
- ``applications``: what ``keras.applications.<family>.preprocess_input`` does, as layers:
  "tf" mode ``x / 127.5 - 1`` (Rescaling); "torch" mode ``x / 255`` then the ImageNet mean and
  std (Rescaling, Normalization); "caffe" mode RGB -> BGR (Permute, Cropping2D, Concatenate: a
  channel flip without weights, so no freeze policy can train it) then the ImageNet mean
  subtracted (Normalization); families that preprocess inside the network (EfficientNet,
  ConvNeXt, MobileNetV3, ...) have an identity ``preprocess_input`` and get no layer.

``resize=True`` puts a `keras.layers.Resizing` to the base's input size first; the stacked model
then takes images of any height and width (its input is ``(None, None, None, channels)``).

A base whose first layers already rescale or normalize (a Keras Applications model built with
``include_preprocessing=True``) gets a warning and no second scaling, unless ``force=True``
(keras#14950, tensorflow#42506: scaling twice ruins accuracy without an error).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import keras

from tfstack.errors import ShapeError
from tfstack.input_range import layers_from_input
from tfstack.shapes import input_specs
from tfstack.vocabulary import (
    APPLICATION_FAMILIES,
    PREPROCESS_KINDS,
    PREPROCESS_OPTIONS,
    unused_option,
)

logger = logging.getLogger(__name__)

# The mode of each family's preprocess_input (keras/src/applications/<family>.py); "none": it
# returns its input unchanged because the network preprocesses itself.
APPLICATION_MODES = {
    "convnext": "none",
    "densenet": "torch",
    "efficientnet": "none",
    "efficientnet_v2": "none",
    "inception_resnet_v2": "tf",
    "inception_v3": "tf",
    "mobilenet": "tf",
    "mobilenet_v2": "tf",
    "mobilenet_v3": "none",
    "nasnet": "tf",
    "resnet": "caffe",
    "resnet50": "caffe",
    "resnet_v2": "tf",
    "vgg16": "caffe",
    "vgg19": "caffe",
    "xception": "tf",
}

# keras/src/applications/imagenet_utils.py, _preprocess_numpy_input.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)  # "torch", of images in [0, 1]
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)  # "caffe", of BGR images in 0..255

BLOCK_NAME = "preprocess"


def build_preprocessing(
    kind: str,
    base: keras.Model,
    *,
    scale: float | None = None,
    offset: float | None = None,
    family: str | None = None,
    resize: bool = False,
    force: bool = False,
    train_inputs: Iterable | None = None,
    key: str = "preprocess",
) -> keras.Model | None:
    """The preprocessing block for inputs of ``base``, or None when there is nothing to do.

    Args:
        kind: ``none``, ``rescale``, ``normalize`` or ``applications``.
        base: the first feature extractor; its input decides the block's output shape.
        scale: ``rescale``: the factor (e.g. ``1/255``); None means 1/255.
        offset: ``rescale``: added after scaling; None means 0.
        family: ``applications``: the Keras Applications module, e.g. ``mobilenet_v2``.
        resize: resize inputs of any size to the base's input height and width first.
        force: scale even when the base already rescales or normalizes its input.
        train_inputs: ``normalize``: the training inputs, as a batched ``tf.data.Dataset`` (or
            any iterable of batches; ``(x, y)`` batches are fine).
        key: the config group, for messages.

    Returns:
        A nested model named ``preprocess`` (raw inputs -> the base's inputs), or None.

    Raises:
        ShapeError: an unknown kind or family, an option the kind does not use, a mode that
            needs RGB images for a base that takes another channel count, ``normalize``
            without training inputs, or ``resize`` for a base that does not take images.

    Example:
        >>> import keras
        >>> from tfstack.preprocessing import build_preprocessing
        >>> base = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3)])
        >>> block = build_preprocessing("applications", base, family="mobilenet_v2")
        >>> [type(layer).__name__ for layer in block.layers]
        ['Rescaling']
    """
    if kind not in PREPROCESS_KINDS:
        raise ShapeError(f"{key}={kind!r} is not valid. Expected one of {list(PREPROCESS_KINDS)}.")
    options = {"scale": scale, "offset": offset, "family": family, "force": force or None}
    unused = unused_option(key, kind, options, PREPROCESS_OPTIONS)
    if unused:
        raise ShapeError(unused)
    spec = input_specs(base)[0]
    image = len(spec.shape) == 4
    if resize and not (image and spec.shape[1] and spec.shape[2]):
        raise ShapeError(
            f"{key}.resize=true resizes images to the base's input size, but {base.name!r} "
            f"takes {spec}. Set {key}.resize=false, or use a base with a fixed image input."
        )
    layers = _scaling_layers(kind, spec, scale=scale, offset=offset, family=family, key=key)
    own = own_preprocessing(base)
    if layers and own:
        if not force:
            logger.warning(
                "%s=%s: the base %r already preprocesses its input (%s), so tfstack adds no "
                "second scaling (it would ruin accuracy). Set %s=none, or %s.force=true to "
                "scale anyway.",
                key,
                kind,
                base.name,
                ", ".join(own),
                key,
                key,
            )
            layers = []
        else:
            logger.warning(
                "%s=%s with %s.force=true: the base %r also preprocesses its input (%s); "
                "the input is scaled twice.",
                key,
                kind,
                key,
                base.name,
                ", ".join(own),
            )
    if resize:
        height, width = int(spec.shape[1]), int(spec.shape[2])
        layers.insert(0, keras.layers.Resizing(height, width, name=f"{BLOCK_NAME}_resize"))
    if not layers:
        return None
    # (batch, h, w, c) of any h and w with resize, else the base's own input shape.
    shape = (None, None, spec.shape[3]) if resize else tuple(spec.shape[1:])
    block = _chain(keras.Input(shape=shape, dtype=spec.dtype, name=f"{BLOCK_NAME}_input"), layers)
    normalize = [layer for layer in block.layers if layer.name == f"{BLOCK_NAME}_normalize"]
    if normalize:
        _adapt(normalize[0], train_inputs, key=key)
    logger.info("Preprocessing %s: %s", kind, [layer.name for layer in block.layers])
    return block


def _scaling_layers(kind, spec, *, scale, offset, family, key) -> list:
    """The layers of one kind (without resizing); callables for the caffe channel flip."""
    if kind == "none":
        return []
    if kind == "rescale":
        return [
            keras.layers.Rescaling(
                1 / 255 if scale is None else scale,
                0.0 if offset is None else offset,
                name=f"{BLOCK_NAME}_rescale",
            )
        ]
    if kind == "normalize":
        return [keras.layers.Normalization(axis=-1, name=f"{BLOCK_NAME}_normalize")]
    if family not in APPLICATION_MODES:
        raise ShapeError(
            f"{key}.family={family!r} is not a Keras Applications family. Expected one of "
            f"{list(APPLICATION_FAMILIES)} (the module of keras.applications.<family>)."
        )
    mode = APPLICATION_MODES[family]
    if mode == "none":
        logger.info(
            "%s.family=%s: its preprocess_input is the identity (the network preprocesses "
            "itself); no layer added",
            key,
            family,
        )
        return []
    if mode == "tf":
        return [keras.layers.Rescaling(1 / 127.5, -1.0, name=f"{BLOCK_NAME}_{family}")]
    channels = spec.shape[-1]
    if channels != 3:
        raise ShapeError(
            f"{key}.family={family} preprocesses RGB images ({mode} mode, per-channel ImageNet "
            f"statistics), but the base takes {spec} with {channels} channel(s). Use "
            f"{key}=rescale or {key}=normalize, or give the base RGB images."
        )
    if mode == "torch":
        return [
            keras.layers.Rescaling(1 / 255, name=f"{BLOCK_NAME}_{family}_scale"),
            keras.layers.Normalization(
                axis=-1,
                mean=list(IMAGENET_MEAN_RGB),
                variance=[s * s for s in IMAGENET_STD_RGB],
                name=f"{BLOCK_NAME}_{family}_normalize",
            ),
        ]
    return [
        _rgb_to_bgr,
        keras.layers.Normalization(
            axis=-1,
            mean=list(IMAGENET_MEAN_BGR),
            variance=[1.0, 1.0, 1.0],
            name=f"{BLOCK_NAME}_{family}_center",
        ),
    ]


def _rgb_to_bgr(x: keras.KerasTensor) -> keras.KerasTensor:
    """Reverse the channel order with weightless builtin layers.

    No builtin layer reverses an axis, and a 1x1 Conv2D with a permutation kernel would have
    weights that every freeze policy lets train (everything outside the feature extractors
    trains). So the channels become rows, each row is cropped out, and they are concatenated
    in reverse.
    """
    rows = keras.layers.Permute((3, 1, 2), name=f"{BLOCK_NAME}_channels_first")(x)  # (b, 3, h, w)
    single = [
        keras.layers.Cropping2D(((c, 2 - c), (0, 0)), name=f"{BLOCK_NAME}_channel_{c}")(rows)
        for c in (2, 1, 0)
    ]  # 3 x (b, 1, h, w)
    bgr = keras.layers.Concatenate(axis=1, name=f"{BLOCK_NAME}_bgr")(single)  # (b, 3, h, w)
    return keras.layers.Permute((2, 3, 1), name=f"{BLOCK_NAME}_channels_last")(bgr)


def _chain(inputs: keras.KerasTensor, layers: list) -> keras.Model:
    """A nested model of ``layers`` (a Sequential when every step is a layer)."""
    if all(isinstance(layer, keras.layers.Layer) for layer in layers):
        return keras.Sequential([inputs, *layers], name=BLOCK_NAME)
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x, name=BLOCK_NAME)


def _adapt(layer: keras.layers.Normalization, train_inputs, *, key: str) -> None:
    if train_inputs is None:
        raise ShapeError(
            f"{key}=normalize adapts its mean and std on the training split, but no training "
            "inputs were given (pass train_inputs=, a batched tf.data.Dataset)."
        )
    layer.adapt(train_inputs)
    logger.info(
        "%s=normalize: per-channel mean %s, variance %s (training split)",
        key,
        keras.ops.convert_to_numpy(layer.mean).reshape(-1).round(4).tolist(),
        keras.ops.convert_to_numpy(layer.variance).reshape(-1).round(4).tolist(),
    )


def own_preprocessing(model: keras.Model) -> list[str]:
    """Names of the Rescaling and Normalization layers a model applies before any weighted layer.

    A Keras Applications model built with ``include_preprocessing=True`` starts with them.
    """
    found = []
    for layer in layers_from_input(model):
        if isinstance(layer, keras.layers.Rescaling | keras.layers.Normalization):
            found.append(layer.name)
        elif layer.weights:
            break
    return found


__all__ = ["APPLICATION_MODES", "build_preprocessing", "own_preprocessing"]
