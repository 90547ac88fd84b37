"""What a frozen part's features depend on, as content hashes: the shared cache's keys.

An entry of `tfstack.feature_cache` holds the outputs of a frozen part
(`tfstack.frozen_features.split_frozen`: the stacked model from its inputs to the cut, so the
preprocessing in front of the base is part of it) for every sample of one split, one row per
sample in input order. Its key (`entry_key`) is a hash of:

- the frozen part (`model_digest`): its architecture (the Keras config: layers, their
  settings, dtype policies, connections) and every weight's name, shape, dtype and values;
  content, never a path, so the same weights loaded from elsewhere hit;
- the split's inputs (`data_digest`): an array's dtype, shape and bytes, or each image file's
  sha256 in order with the decoding options (size, color mode, interpolation, crop); the
  sample order of training (shuffle, seed) is not part of it, since rows are stored by sample
  index and every order reads the same rows;
- the batch size the outputs are computed in (the uncached phase's, for exactness),
  Keras's global dtype policy, and the TensorFlow and Keras versions, the machine's processor
  and the devices (another kernel may round differently).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from functools import cache

import numpy as np

FORMAT = 1
"""The version of the entries' layout and of what the keys cover; a change misses every entry."""


def model_digest(model) -> str:
    """sha256 of a Keras model's architecture and weights (what its outputs depend on)."""
    digest = hashlib.sha256()
    config = json.dumps(_inference_config(model.get_config()), sort_keys=True, default=repr)
    digest.update(config.encode())
    for variable in model.weights:
        value = np.ascontiguousarray(np.asarray(variable.numpy()))
        digest.update(f"\n{variable.path}\t{value.dtype}\t{value.shape}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _inference_config(config):
    """``config`` without what does not change a frozen part's outputs in inference mode.

    That is BatchNormalization's ``synchronized`` (batch statistics across replicas, in training
    only), which multi-worker training turns on (``distribute.sync_batchnorm``): the workers
    then find the features a single process stored.
    """
    if isinstance(config, list):
        return [_inference_config(c) for c in config]
    if not isinstance(config, dict):
        return config
    config = {k: _inference_config(v) for k, v in config.items()}
    if config.get("class_name") == "BatchNormalization" and isinstance(config.get("config"), dict):
        config["config"] = {k: v for k, v in config["config"].items() if k != "synchronized"}
    return config


def data_digest(data) -> str | None:
    """sha256 of an `IndexedDataset`'s inputs in input order, or None if they cannot be hashed.

    Arrays (`ArrayDataset`) hash their dtype, shape and bytes; image files
    (`tfstack.images.ImageDataset`) each file's sha256 (not its path) and the decoding options.
    """
    from tfstack.datasets import ArrayDataset

    digest = hashlib.sha256(f"n={len(data)} batch_size={data.batch_size}\n".encode())
    if isinstance(data, ArrayDataset):
        arrays = data.x if isinstance(data.x, list | tuple) else [data.x]
        for array in arrays:
            value = np.ascontiguousarray(np.asarray(array))
            digest.update(f"array {value.dtype} {value.shape}\n".encode())
            digest.update(value.tobytes())
        return digest.hexdigest()
    from tfstack.images import ImageDataset

    if isinstance(data, ImageDataset):
        from tfstack.image_files import _file_sha256  # cached per (path, size, mtime)

        options = data.options
        digest.update(
            f"images {options.image_size} {options.color_mode} {options.interpolation} "
            f"crop={options.crop_to_aspect_ratio}\n".encode()
        )
        for path in data.files:
            stat = os.stat(path)
            digest.update(f"{_file_sha256(path, stat.st_size, stat.st_mtime_ns)}\n".encode())
        return digest.hexdigest()
    return None


def environment() -> dict[str, str]:
    """What the outputs' rounding depends on besides the model and data."""
    import keras
    import tensorflow as tf

    accelerators = [d.device_type for d in tf.config.list_logical_devices()]
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "dtype_policy": keras.config.dtype_policy().name,
        "machine": f"{platform.machine()} {_processor()}",
        "devices": ",".join(sorted(d for d in accelerators if d != "CPU")) or "CPU",
    }


def entry_key(model: str, data: str, env: dict[str, str]) -> str:
    """The entry's key: 32 hex digits of the hash over model, data and environment."""
    text = json.dumps({"format": FORMAT, "model": model, "data": data, **env}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@cache
def _processor() -> str:
    """The processor's model name (``/proc/cpuinfo``), else `platform.processor`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
