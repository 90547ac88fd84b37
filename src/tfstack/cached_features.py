"""The frozen part's outputs of a cached phase's splits: shared cache, memory or streamed.

`phase_features` gives, for each split of a phase that `tfstack.frozen_features` cut after its
frozen part, that part's outputs with one row per sample in input order, and says where they
came from: read from the shared on-disk cache (`tfstack.feature_cache`, keyed by
`tfstack.feature_keys`), or computed (and stored). Outputs larger than the phase's memory
budget (``feature_memory_mb``) are not held: they are extracted batch by batch into files and
read back by rows in the same batches and order (`tfstack.feature_streaming`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras

from tfstack.datasets import IndexedDataset
from tfstack.frozen_features import FrozenSplit, frozen_outputs

logger = logging.getLogger(__name__)


@dataclass
class CachedFeatures:
    """The frozen part's outputs of a phase's splits, and where they came from.

    Attributes:
        outputs: ``{"train": ..., "val": ...}``: per split, one array (or a list, one per cut
            tensor) with one row per sample in input order; or, streamed (larger than the
            memory budget), a `tfstack.feature_streaming.StoredFeatures` reading those rows
            from files. `IndexedDataset.with_inputs` takes either.
        status: ``hit`` (every split read from the shared cache), ``miss`` (one or more
            computed and stored) or ``off`` (no shared cache, or the data cannot be hashed).
        keys: The shared cache's key of each split (`tfstack.feature_keys.entry_key`).
        streamed: Whether the outputs are read from files (`close` them after training).
    """

    outputs: dict
    status: str
    keys: dict[str, str]
    streamed: bool = False

    def close(self) -> None:
        """Close streamed features' files; a run's temporary ones are removed."""
        for output in self.outputs.values():
            close = getattr(output, "close", None)
            if close is not None:
                close()


def phase_features(
    split: FrozenSplit, datasets: dict, cache=None, *, memory_mb: float | None = None
) -> CachedFeatures:
    """The frozen part's outputs for each split, from the shared cache ``cache`` if given.

    Below ``memory_mb`` (the outputs of every split together, from the frozen part's static
    shapes) they are arrays in memory. Above it they are streamed: extracted batch by batch
    into the cache entry's files (or, without a cache, a temporary directory of this run, removed
    by `CachedFeatures.close`) and read back by rows, so memory holds a few batches whatever
    the data's size (`tfstack.feature_streaming`).

    Args:
        split: The phase's `FrozenSplit`.
        datasets: ``{"train": IndexedDataset, "val": IndexedDataset or None}``.
        cache: A `tfstack.feature_cache.FeatureCache`, or None (compute, keep nothing).
        memory_mb: The memory budget of the features in MB (None: always in memory).

    Returns:
        The outputs, the cache status and the keys. Close it after training.
    """
    from tfstack import feature_keys, feature_streaming

    present = {name: data for name, data in datasets.items() if data is not None}
    rows = [len(data) for data in present.values()]
    stream = feature_streaming.over_budget(split.frozen, rows, memory_mb)
    digests = {}
    if cache is not None:
        digests = {name: feature_keys.data_digest(data) for name, data in present.items()}
    if cache is None or None in digests.values():
        if cache is not None:
            unhashed = next(iter(present.values()))
            logger.info("Not using the feature cache: %s cannot be hashed", type(unhashed))
        if not stream:
            outputs = {name: frozen_outputs(split.frozen, data) for name, data in present.items()}
            return CachedFeatures(outputs, "off", {})
        features = CachedFeatures({}, "off", {}, streamed=True)
        try:
            for name, data in present.items():
                features.outputs[name] = _temporary_outputs(split.frozen, data, name)
        except BaseException:
            features.close()
            raise
        return features
    model = feature_keys.model_digest(split.frozen)
    environment = feature_keys.environment()
    features = CachedFeatures({}, "miss", {}, streamed=stream)
    hits = []
    try:
        for name, data in present.items():
            key = feature_keys.entry_key(model, digests[name], environment)
            meta = {
                "model": split.frozen.name,
                "cut": list(split.cut),
                "data": f"{name} split, {_describe(data)}",
                **environment,
            }
            if stream:
                stored, hit = cache.get_or_write(
                    key,
                    lambda directory, data=data: feature_streaming.write_outputs(
                        split.frozen, data.input_batches(), len(data), directory
                    ),
                    meta,
                    expected_bytes=feature_streaming.expected_bytes(split.frozen, len(data)),
                )
                if stored is None:  # not storable in the cache: this run's own files
                    stored = _temporary_outputs(split.frozen, data, name)
                features.outputs[name] = stored
            else:

                def compute(data=data):
                    result = frozen_outputs(split.frozen, data)
                    return list(result) if isinstance(result, list | tuple) else [result]

                arrays, hit = cache.get_or_compute(key, compute, meta)
                features.outputs[name] = arrays[0] if len(arrays) == 1 else arrays
            features.keys[name] = key
            hits.append(hit)
            logger.info(
                "Feature cache %s for the %s split: %s", "hit" if hit else "miss", name, key
            )
    except BaseException:
        features.close()
        raise
    features.status = "hit" if all(hits) else "miss"
    return features


def _temporary_outputs(frozen: keras.Model, data: IndexedDataset, name: str):
    """The outputs for ``data`` in a temporary directory of this run (`temporary_features`)."""
    from tfstack import feature_streaming

    return feature_streaming.temporary_features(frozen, data.input_batches(), len(data), name=name)


def _describe(data: IndexedDataset) -> str:
    """``1400 samples, arrays (32, 32, 3) float32`` or ``1400 image files under /data``."""
    files = getattr(data, "files", None)
    if files is not None:
        import os

        return f"{len(data)} image files under {os.path.commonpath(files) if files else '?'}"
    x = getattr(data, "x", None)
    arrays = x if isinstance(x, list | tuple) else [x]
    shapes = ", ".join(f"{tuple(a.shape[1:])} {a.dtype}" for a in arrays if hasattr(a, "shape"))
    return f"{len(data)} samples, arrays {shapes}"
