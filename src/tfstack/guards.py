"""Turn TensorFlow failures caused by a setting into `TfstackError`s that say what to change.

With ``train.deterministic=true`` tfstack turns on TensorFlow's op determinism. An op without a
deterministic kernel on the device then fails inside ``fit`` with a TensorFlow error (GPU kernels
raise ``UnimplementedError``; on CPU a few ops, such as ``Timestamp``, raise
``FailedPreconditionError``, and unseeded random ops a ``RuntimeError``). `determinism_errors`
turns those into a `TrainingError` naming the op and the setting, and lets every other error
through unchanged.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from tfstack.errors import TfstackError, TrainingError

# Most specific first: graph errors end with "[Op:__inference_<function>]", which names no op.
_OP_PATTERNS = (
    r"^(\w+) cannot be called when determinism is enabled",
    r"implementation of (\w+)",
    r"supported for (\w+)",
    r"\{\{node ([^}]+)\}\}",
    r"\[Op:(?!__inference)(\w+)\]",
)


def is_determinism_error(error: BaseException) -> bool:
    """Whether TensorFlow raised ``error`` because op determinism is on."""
    import tensorflow as tf

    if isinstance(error, TfstackError):
        return False
    text = str(error).lower()
    mentions = "determinis" in text
    kinds = (tf.errors.UnimplementedError, tf.errors.FailedPreconditionError, RuntimeError)
    return mentions and isinstance(error, kinds)


def op_name(error: BaseException) -> str:
    """The op a determinism error names, or "an op" when it names none."""
    lines = [line.strip() for line in str(error).splitlines()]
    for pattern in _OP_PATTERNS:
        for line in lines:
            found = re.search(pattern, line)
            if found:
                return found.group(1)
    return "an op"


@contextlib.contextmanager
def determinism_errors(setting: str = "train.deterministic") -> Iterator[None]:
    """Re-raise TensorFlow's op-determinism failures as a `TrainingError` naming op and setting.

    Raises:
        TrainingError: an op has no deterministic implementation on this device.
    """
    try:
        yield
    except Exception as err:
        if not is_determinism_error(err):
            raise
        op = op_name(err)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if "determinis" in line.lower()), lines[0])
        raise TrainingError(
            f"TensorFlow has no deterministic implementation of {op} here, and {setting}=true "
            f"asks for op determinism ({type(err).__name__}: {detail[:300]}). Set "
            f"{setting}=false to run it anyway (runs are then not bit-for-bit repeatable), or "
            f"replace the layer that uses {op}."
        ) from err


def is_xla_error(error: BaseException) -> bool:
    """Whether XLA refused to compile a training step (``jit_compile=True``, an op without XLA).

    ``jit_compile=True`` has must-compile semantics: a graph with an op that has no XLA kernel on
    the device fails at its first step with ``InvalidArgumentError: Detected unsupported
    operations when trying to compile graph ... on XLA_CPU_JIT: <Op> (No registered ...)``.
    """
    import tensorflow as tf

    text = str(error).lower()
    return isinstance(error, tf.errors.InvalidArgumentError) and (
        "unsupported operations when trying to compile" in text
    )


@contextlib.contextmanager
def xla_errors(setting: str = "train.jit_compile") -> Iterator[None]:
    """Re-raise XLA's refusal to compile an op as a `TrainingError` naming the op and setting.

    Raises:
        TrainingError: ``setting`` is true and an op of the model has no XLA kernel here.
    """
    try:
        yield
    except Exception as err:
        if not is_xla_error(err):
            raise
        found = re.search(r"on XLA_\w+: (\w+) \(", str(err))
        op = found.group(1) if found else op_name(err)
        raise TrainingError(
            f"XLA cannot compile {op} on this device, and {setting}=true asks for XLA: every "
            f"op of a training step must have an XLA kernel. Set {setting}=auto (Keras then "
            f"decides) or false, or replace the layer that uses {op}."
        ) from err


def no_xla_reason(model) -> str:
    """Why Keras compiles ``model`` without XLA although ``jit_compile=True`` was asked for."""
    from tfstack import _keras_compat

    layers = [
        f"{layer.name} ({type(layer).__name__})"
        for layer in _keras_compat.flatten_layers(model)
        if not getattr(layer, "supports_jit", True)
    ]
    if layers:
        why = f"these layers do not support XLA: {', '.join(layers[:5])}"
    else:
        why = "TensorFlow's op determinism is on (Keras runs no XLA under it)"
    return (
        f"train.jit_compile=true, but Keras would train model {model.name!r} without XLA: "
        f"{why}. Set train.jit_compile=auto or false"
        + ("" if layers else ", or train.deterministic=false")
        + "."
    )
