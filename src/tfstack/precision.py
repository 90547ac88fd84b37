"""Mixed precision: the Keras dtype policy of the stacked model (``float32`` or mixed).

A policy set with ``keras.config.set_dtype_policy`` applies only to layers created after it;
a loaded model keeps the policy each layer was saved with (``"float32"``, written explicitly
in every layer's config), so setting the global policy before loading changes nothing.
`apply_policy` therefore sets the policy on each layer of a loaded component, in place: its
variables stay what they are (a mixed policy keeps float32 variables), so the weights are
exactly the file's, and only the compute dtype changes. Layers the stacked model creates
afterwards (preprocessing, augmentation, adapters) take the policy from `precision_scope`.

The head's output layers stay float32 (``float32_outputs``), as the Keras mixed-precision
guide recommends: the softmax and the loss are computed in float32. Keras itself wraps the
optimizer in a ``LossScaleOptimizer`` at ``compile`` when the model's policy is
``mixed_float16`` (``keras/src/trainers/trainer.py``), which is why the stacked model itself
must carry the policy; the discriminative optimizers of `tfstack.schedules` run wrapped.

The saved ``.keras`` file records each layer's policy, so it reloads with the same dtypes.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator

import keras

from tfstack._keras_compat import flatten_layers, producer
from tfstack.vocabulary import PRECISIONS

logger = logging.getLogger(__name__)

FLOAT32 = "float32"


@contextlib.contextmanager
def precision_scope(policy: str) -> Iterator[None]:
    """Make ``policy`` Keras's global dtype policy inside the block, then restore the previous.

    Args:
        policy: one of `tfstack.vocabulary.PRECISIONS`.
    """
    if policy not in PRECISIONS:
        raise ValueError(f"Unknown precision {policy!r}. Expected one of {list(PRECISIONS)}.")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def apply_policy(
    model: keras.Model,
    policy: str,
    *,
    float32_outputs: bool = False,
    float32_blocks: tuple[str, ...] = (),
) -> list[str]:
    """Set ``policy`` on a (loaded) model and every layer in it, in place; weights unchanged.

    Input layers keep their dtype (the data's). With ``float32_outputs`` the layers that
    produce the model's outputs (inside nested models too) stay float32, so its outputs are
    float32 whatever the policy.

    Args:
        model: a model, typically a component just loaded from a file.
        policy: one of `tfstack.vocabulary.PRECISIONS`.
        float32_outputs: keep the output layers float32 (for the head).
        float32_blocks: names of nested models whose layers stay float32 (the preprocessing
            and augmentation in front of the base: pixels are scaled at full precision, and
            the base's float32 input takes their output as it is).

    Returns:
        The names of the layers kept float32.
    """
    if policy not in PRECISIONS:
        raise ValueError(f"Unknown precision {policy!r}. Expected one of {list(PRECISIONS)}.")
    kept = output_layers(model) if float32_outputs and policy != FLOAT32 else []
    for block in model.layers if float32_blocks else []:
        if isinstance(block, keras.Model) and block.name in float32_blocks:
            kept += [
                b
                for b in flatten_layers(block)
                if b is not block and not isinstance(b, keras.layers.InputLayer)
            ]
    kept_ids = {id(layer) for layer in kept}
    for layer in flatten_layers(model):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        layer.dtype_policy = FLOAT32 if id(layer) in kept_ids else policy
    return [layer.name for layer in kept]


def output_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers whose outputs are the model's outputs, at any depth (not the models)."""
    found = []
    for tensor in keras.tree.flatten(model.outputs):
        layer, _ = producer(tensor)
        if isinstance(layer, keras.Model):
            found.extend(output_layers(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            found.append(layer)
    return found


def policy_counts(model: keras.Model) -> dict[str, int]:
    """How many layers (models and input layers aside) compute under each dtype policy."""
    return dict(
        Counter(
            layer.dtype_policy.name
            for layer in flatten_layers(model)
            if not isinstance(layer, keras.Model | keras.layers.InputLayer)
        )
    )


def slow_on_this_machine(policy: str) -> str | None:
    """A warning when ``policy`` will be slow here (float16 without a GPU), else None."""
    if policy != "mixed_float16":
        return None
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return None
    return (
        "train.precision=mixed_float16 on a machine without a GPU: CPUs compute float16 "
        "slowly (emulated), so training will be slower than float32. Use "
        "train.precision=mixed_bfloat16 or float32 here."
    )
