"""Real model files made in a test, and ways to damage them (test_model_files, test_fuzz_files).

The models are saved by Keras itself (a tiny conv base with BatchNormalization, from conftest),
then changed the way a bad copy, a careless edit or an attacker would: members of the `.keras`
zip replaced, removed or renamed, attributes and datasets of an `.h5` replaced.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
from conftest import make_base

GiB = 1 << 30


def save_base(directory: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Save the tiny conv base as `base.keras` and legacy `base.h5`.

    Returns:
        The two paths, an input batch, and the model's predictions on it.
    """
    keras.utils.set_random_seed(0)
    model = make_base()
    inputs = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype("float32")
    expected = model.predict(inputs, verbose=0)
    keras_path, h5_path = directory / "base.keras", directory / "base.h5"
    model.save(keras_path)
    model.save(h5_path)
    return keras_path, h5_path, inputs, expected


def rewrite_archive(
    source: Path,
    destination: Path,
    *,
    replace: dict[str, bytes] | None = None,
    drop: tuple[str, ...] = (),
    rename: dict[str, str] | None = None,
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """Copy a `.keras` zip member by member, replacing, dropping or renaming members."""
    replace, rename = replace or {}, rename or {}
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(destination, "w", compression) as new:
        for info in old.infolist():
            if info.filename in drop:
                continue
            data = replace[info.filename] if info.filename in replace else old.read(info)
            new.writestr(rename.get(info.filename, info.filename), data)
    return destination


def archive_member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(name)


def write_expanding_member(destination: Path, name: str, prefix: bytes, size: int, suffix: bytes):
    """A zip whose member `name` is `prefix`, then spaces, then `suffix`: `size` bytes in all,
    DEFLATE-compressed to a few MB (JSON stays valid: whitespace)."""
    chunk = b" " * (1 << 24)
    remaining = size - len(prefix) - len(suffix)
    with zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open(name, "w", force_zip64=True) as member:
            member.write(prefix)
            while remaining > 0:
                member.write(chunk[: min(remaining, len(chunk))])
                remaining -= len(chunk)
            member.write(suffix)
    return destination


def first_dataset(file: h5py.File) -> str:
    names = []
    file.visititems(
        lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None
    )
    return sorted(names)[0]


def replace_with_bomb_dataset(file: h5py.File, name: str, declared: int = GiB) -> None:
    """Replace dataset `name` by a gzip-chunked float32 one declaring `declared` bytes, of which
    one chunk is written: it stores about a kilobyte."""
    del file[name]
    dataset = file.create_dataset(
        name, shape=(declared // 4,), dtype="float32", chunks=(1 << 18,), compression="gzip"
    )
    dataset[: 1 << 18] = 0


def keras_with_bomb_weights(source: Path, destination: Path, declared: int = GiB) -> Path:
    """A `.keras` whose `model.weights.h5` has one dataset declaring `declared` bytes."""
    scratch = destination.with_suffix(".weights.h5")
    scratch.write_bytes(archive_member(source, "model.weights.h5"))
    with h5py.File(scratch, "r+") as file:
        replace_with_bomb_dataset(file, first_dataset(file), declared)
    rewrite_archive(source, destination, replace={"model.weights.h5": scratch.read_bytes()})
    scratch.unlink()
    return destination


def h5_with_bomb_dataset(source: Path, destination: Path, declared: int = GiB) -> Path:
    """A legacy `.h5` with one weights dataset declaring `declared` bytes."""
    shutil.copy(source, destination)
    with h5py.File(destination, "r+") as file:
        replace_with_bomb_dataset(file, first_dataset(file), declared)
    return destination


def h5_with_attribute(source: Path, destination: Path, value, name: str = "model_config") -> Path:
    """A copy of a legacy `.h5` whose attribute `name` is replaced by `value`."""
    shutil.copy(source, destination)
    with h5py.File(destination, "r+") as file:
        del file.attrs[name]
        file.attrs[name] = value
    return destination
