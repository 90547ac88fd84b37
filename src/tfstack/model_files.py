"""Bounded, validated reading of model files: the config of a `.keras` archive or a legacy `.h5`.

A model file is input the user may not control. Before Keras sees it, tfstack checks every size
the file declares against a limit, so a small file that expands to gigabytes (a zip member that
inflates, an HDF5 dataset that declares a huge shape over a few compressed bytes) is refused
before anything is read into memory; then it parses the config step by step (zip, UTF-8, JSON,
nesting depth, the types Keras expects), so a damaged file fails with one line naming the file.

Limits (environment variables, in bytes or with a KiB/MiB/GiB suffix):

- ``TFSTACK_MAX_MODEL_CONFIG_BYTES`` (default 64 MiB): the model config, i.e. ``config.json``
  and ``metadata.json`` of a `.keras` archive and the ``model_config`` attribute of an `.h5`.
  The largest config of Keras Applications (NASNetLarge) is 1.0 MB, nested 11 deep.
- ``TFSTACK_MAX_MODEL_BYTES`` (default 16 GiB): the whole model, i.e. the declared uncompressed
  sizes of all archive members, and the declared sizes (shape x item size) of all HDF5 datasets.

And, whatever the limits: an archive member or dataset larger than 64 MiB must not declare more
than 100 times the bytes it stores. Keras writes both uncompressed, and DEFLATE of real weights
gains far less; only a decompression or shape bomb expands like that.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from dataclasses import dataclass

import h5py

from tfstack.errors import ComponentError, ConfigError, describe_error

MiB = 1 << 20
GiB = 1 << 30
CONFIG_LIMIT_VARIABLE = "TFSTACK_MAX_MODEL_CONFIG_BYTES"
MODEL_LIMIT_VARIABLE = "TFSTACK_MAX_MODEL_BYTES"
DEFAULT_MAX_CONFIG_BYTES = 64 * MiB
DEFAULT_MAX_MODEL_BYTES = 16 * GiB
MAX_EXPANSION = 100  # declared bytes per stored byte, beyond which a large item is a bomb
EXPANSION_FLOOR_BYTES = 64 * MiB  # smaller items may compress well (zeros): no ratio check
MAX_CONFIG_DEPTH = 100  # nesting levels of JSON; real Keras configs nest about 15-30

KERAS_CONFIG_MEMBER = "config.json"
KERAS_METADATA_MEMBER = "metadata.json"
KERAS_WEIGHTS_MEMBER = "model.weights.h5"
H5_CONFIG_ATTRIBUTE = "model_config"
_SIZE = re.compile(r"^\s*(\d+)\s*(|B|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": MiB, "gib": GiB, "tib": 1 << 40}


@dataclass(frozen=True)
class Limits:
    """Size limits of model files, in bytes.

    Attributes:
        config_bytes: Largest model config (``config.json``, ``metadata.json``, ``model_config``).
        model_bytes: Largest model: declared archive members, or declared HDF5 datasets, in total.
    """

    config_bytes: int = DEFAULT_MAX_CONFIG_BYTES
    model_bytes: int = DEFAULT_MAX_MODEL_BYTES

    @classmethod
    def from_environment(cls) -> Limits:
        """The limits set by ``TFSTACK_MAX_MODEL_CONFIG_BYTES`` and ``TFSTACK_MAX_MODEL_BYTES``.

        Raises:
            ConfigError: A variable is set to something that is not a size.
        """
        return cls(
            config_bytes=_size_from_environment(CONFIG_LIMIT_VARIABLE, DEFAULT_MAX_CONFIG_BYTES),
            model_bytes=_size_from_environment(MODEL_LIMIT_VARIABLE, DEFAULT_MAX_MODEL_BYTES),
        )


def read_keras_config(path: str, *, key: str, limits: Limits | None = None) -> dict:
    """Check a `.keras` archive's sizes and read its ``config.json``.

    Checks, before reading any member: the declared sizes in the zip's central directory (config
    and metadata against the config limit, all members against the model limit, each member's
    expansion), then the declared size of every dataset of ``model.weights.h5``, opened inside
    the archive. Reads ``config.json`` with a bounded read and validates it (`parse_config`).

    Args:
        path: The `.keras` file.
        key: Config key prefix for messages, e.g. ``components.base``.
        limits: Size limits; defaults to `Limits.from_environment`.

    Returns:
        The model config, a dict with ``class_name`` and ``config``.

    Raises:
        ComponentError: The file is not a readable archive, exceeds a limit, or its config is
            damaged.
    """
    limits = limits or Limits.from_environment()
    where = f"{key}.path={path}"
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            if KERAS_CONFIG_MEMBER not in members:
                raise ComponentError(
                    f"{where} is not a readable .keras file: expected a zip archive holding "
                    f"config.json, found {sorted(members)[:5] or 'no member'}. The file is "
                    f"probably truncated or corrupt; copy it again or re-save it with "
                    f"model.save('model.keras')."
                )
            _check_archive_sizes(members.values(), where=where, limits=limits)
            with archive.open(KERAS_CONFIG_MEMBER) as member:
                # A ZipExtFile never returns more than the member's declared size (checked
                # above); the bound makes the read safe even if it did.
                raw = member.read(limits.config_bytes + 1)
            if len(raw) > limits.config_bytes:
                raise _too_large(where, KERAS_CONFIG_MEMBER, len(raw), limits.config_bytes)
            if KERAS_WEIGHTS_MEMBER in members:
                # h5py reads the member in place (a seekable file object), metadata only.
                with archive.open(KERAS_WEIGHTS_MEMBER) as weights, h5py.File(weights) as file:
                    _check_datasets(file, where=f"{where} ({KERAS_WEIGHTS_MEMBER})", limits=limits)
    except ComponentError:
        raise
    except Exception as err:  # zipfile, zlib and h5py raise many types for a damaged archive
        raise ComponentError(
            f"{where} is not a readable .keras file: expected a zip archive holding "
            f"config.json ({describe_error(err)}). The file is probably truncated or corrupt; copy "
            f"it again or re-save it with model.save('model.keras')."
        ) from err
    return parse_config(raw, where=f"{where} ({KERAS_CONFIG_MEMBER})")


def read_h5_config(path: str, *, key: str, limits: Limits | None = None) -> dict:
    """Check a legacy `.h5` file's sizes and read its ``model_config`` attribute.

    Checks, before reading the attribute: that it is one string (not an array) whose stored size
    fits the config limit, and that the declared sizes of all datasets fit the model limit.

    Args:
        path: The `.h5`/`.hdf5` file.
        key: Config key prefix for messages, e.g. ``components.base``.
        limits: Size limits; defaults to `Limits.from_environment`.

    Returns:
        The model config, a dict with ``class_name`` and ``config``.

    Raises:
        ComponentError: The file is not readable HDF5, holds no model, exceeds a limit, or its
            config is damaged.
    """
    limits = limits or Limits.from_environment()
    where = f"{key}.path={path}"
    try:
        with h5py.File(path, "r") as file:
            if H5_CONFIG_ATTRIBUTE not in file.attrs:
                raise ComponentError(
                    f"{where} holds no model: the HDF5 file has no model_config (weights "
                    f"only, e.g. from save_weights(), or not a Keras file). Save the whole model "
                    f"with model.save('model.keras'), or build the model in code and load these "
                    f"weights."
                )
            _check_datasets(file, where=where, limits=limits)
            raw = _read_config_attribute(file, where=where, limits=limits)
    except ComponentError:
        raise
    except Exception as err:  # h5py raises OSError, KeyError, RuntimeError, ... when damaged
        raise ComponentError(
            f"{where} is not a readable HDF5 file ({describe_error(err)}). The file is probably "
            f"truncated or corrupt; copy it again or re-save the model with model.save(...)."
        ) from err
    return parse_config(raw, where=f"{where} ({H5_CONFIG_ATTRIBUTE})")


def parse_config(raw: bytes | str, *, where: str) -> dict:
    """Parse a serialized Keras model config and check the structure Keras relies on.

    Args:
        raw: The config as read from the file (UTF-8 bytes, or text).
        where: What was read, for messages: ``components.base.path=m.keras (config.json)``.

    Returns:
        The config: a dict whose ``class_name`` is a string and whose ``config`` is a dict;
        its ``layers``, if any, a list of dicts, each with a string ``class_name``.

    Raises:
        ComponentError: Not UTF-8, not JSON, nested too deeply, or not shaped like a model config.
    """
    fix = "The file is damaged or not a Keras model; re-save it with model.save('model.keras')."
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            problem = describe_error(err)
            raise ComponentError(f"{where} is not UTF-8 text ({problem}). {fix}") from err
    try:
        config = json.loads(raw)
    except RecursionError as err:  # the C scanner recurses once per nesting level
        raise ComponentError(
            f"{where} is nested too deeply to parse (more than {MAX_CONFIG_DEPTH} levels). {fix}"
        ) from err
    except ValueError as err:  # JSONDecodeError, and int() of a number with too many digits
        raise ComponentError(f"{where} is not valid JSON ({describe_error(err)}). {fix}") from err
    huge = _huge_integer(config)
    if huge is not None:
        raise ComponentError(
            f"{where} holds the integer {str(huge)[:30]}..., beyond 64 bits: no Keras setting "
            f"takes it. {fix}"
        )
    if _nesting_depth(config) > MAX_CONFIG_DEPTH:
        raise ComponentError(
            f"{where} is nested more than {MAX_CONFIG_DEPTH} levels deep; Keras model configs "
            f"nest far less (about 10 to 30). {fix}"
        )
    problem = _structure_problem(config)
    if problem:
        raise ComponentError(f"{where} is not a Keras model config: {problem}. {fix}")
    return config


def format_size(size: int) -> str:
    """A byte count for people: ``1.0 GiB (1073741824 bytes)``."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit} ({size} bytes)"
    return f"{size} bytes"


def _size_from_environment(variable: str, default: int) -> int:
    value = os.environ.get(variable)
    if value is None or not value.strip():
        return default
    match = _SIZE.match(value)
    if not match or int(match.group(1)) <= 0:
        raise ConfigError(
            f"{variable}={value!r} is not a size: expected a positive number of bytes, "
            f"optionally with KiB, MiB or GiB (e.g. {variable}=2GiB). Unset it for the default "
            f"({format_size(default)})."
        )
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _check_archive_sizes(members, *, where: str, limits: Limits) -> None:
    """Check the declared sizes of a zip's central directory, before reading any member."""
    total = 0
    for info in members:
        if info.filename in (KERAS_CONFIG_MEMBER, KERAS_METADATA_MEMBER):
            if info.file_size > limits.config_bytes:
                raise _too_large(where, info.filename, info.file_size, limits.config_bytes)
        _check_expansion(where, info.filename, info.file_size, info.compress_size)
        total += info.file_size
        if total > limits.model_bytes:
            raise _too_large(where, "its members in total", total, limits.model_bytes)


def _check_datasets(file: h5py.File, *, where: str, limits: Limits) -> None:
    """Check every HDF5 dataset's declared size (shape x item size), before reading any."""
    datasets = []
    file.visititems(
        lambda name, item: datasets.append((name, item)) if isinstance(item, h5py.Dataset) else None
    )
    total = 0
    for name, dataset in datasets:
        if dataset.dtype.kind == "O":
            # Variable-length items are read one heap object each; a file can point many
            # items at one large object, so their size is unknown until read. Keras weights
            # are numbers.
            raise ComponentError(
                f"{where}: dataset {name} holds variable-length items ({dataset.dtype}), not "
                f"numbers; Keras weights are numeric arrays. The file is damaged or not a Keras "
                f"model; re-save it with model.save('model.keras')."
            )
        declared = math.prod(dataset.shape or ()) * dataset.dtype.itemsize
        _check_expansion(where, f"dataset {name}", declared, dataset.id.get_storage_size())
        total += declared
        if total > limits.model_bytes:
            raise _too_large(where, "its datasets in total", total, limits.model_bytes)


def _read_config_attribute(file: h5py.File, *, where: str, limits: Limits) -> bytes | str:
    """Read ``model_config`` after checking it is one string of bounded size."""
    limit = limits.config_bytes
    attribute = file.attrs.get_id(H5_CONFIG_ATTRIBUTE)
    kind = attribute.get_type()
    if not isinstance(kind, h5py.h5t.TypeStringID):
        raise ComponentError(
            f"{where}: its {H5_CONFIG_ATTRIBUTE} attribute is not a string but "
            f"{file.attrs.get_id(H5_CONFIG_ATTRIBUTE).dtype}. The file is damaged or not a "
            f"Keras model; re-save it with model.save('model.keras')."
        )
    if attribute.shape != ():
        raise ComponentError(
            f"{where}: its {H5_CONFIG_ATTRIBUTE} attribute is an array of shape "
            f"{attribute.shape}, expected one string. The file is damaged or not a Keras model; "
            f"re-save it with model.save('model.keras')."
        )
    # A fixed-length string stores its bytes in the attribute; a variable-length one (h5py's
    # default) stores a reference to one uncompressed heap object, which is at most the file.
    stored = attribute.get_storage_size() if not kind.is_variable_str() else 0
    if stored > limit:
        raise _too_large(where, H5_CONFIG_ATTRIBUTE, stored, limit)
    value = file.attrs[H5_CONFIG_ATTRIBUTE]
    if hasattr(value, "decode") or isinstance(value, str):
        raw = value if isinstance(value, str) else bytes(value)
        if len(raw) > limit:
            raise _too_large(where, H5_CONFIG_ATTRIBUTE, len(raw), limit)
        return raw
    raise ComponentError(
        f"{where}: its {H5_CONFIG_ATTRIBUTE} attribute reads as {type(value).__name__}, "
        f"expected a string. The file is damaged; re-save it with model.save('model.keras')."
    )


def _check_expansion(where: str, item: str, declared: int, stored: int) -> None:
    if declared > EXPANSION_FLOOR_BYTES and declared > MAX_EXPANSION * stored:
        raise ComponentError(
            f"{where}: {item} declares {format_size(declared)} but stores only "
            f"{format_size(stored)}, more than {MAX_EXPANSION} times as much: a decompression "
            f"bomb, not a saved model (Keras stores weights uncompressed). If the model is "
            f"genuine, re-save it with model.save('model.keras')."
        )


def _too_large(where: str, item: str, size: int, limit: int) -> ComponentError:
    config_item = item in (KERAS_CONFIG_MEMBER, KERAS_METADATA_MEMBER, H5_CONFIG_ATTRIBUTE)
    variable, what = (
        (CONFIG_LIMIT_VARIABLE, "model config") if config_item else (MODEL_LIMIT_VARIABLE, "model")
    )
    return ComponentError(
        f"{where}: {item} is {format_size(size)}, more than the {what} limit of "
        f"{format_size(limit)}. If the file is genuine, raise the limit, e.g. "
        f"{variable}={max(2 * limit, size) // GiB + 1}GiB."
    )


def _nesting_depth(value: object) -> int:
    """The nesting depth of parsed JSON, up to just past the limit, without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_CONFIG_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return deepest


def _huge_integer(value: object) -> int | None:
    """An integer beyond int64 anywhere in parsed JSON (TensorFlow overflows on it), or None."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 2**63:
            return item
    return None


def _structure_problem(config: object) -> str | None:
    """What in a parsed config is not the shape Keras expects, or None."""
    if not isinstance(config, dict):
        return f"expected a JSON object at the top, found {_json_type(config)}"
    if not isinstance(config.get("class_name"), str):
        return f"'class_name' must be a string, found {_json_type(config.get('class_name'))}"
    if not isinstance(config.get("config"), dict):
        return f"'config' must be an object, found {_json_type(config.get('config'))}"
    layers = config["config"].get("layers")
    if layers is None:
        return None
    if not isinstance(layers, list):
        return f"'config.layers' must be a list, found {_json_type(layers)}"
    for index, layer in enumerate(layers):
        if not isinstance(layer, dict):
            return f"'config.layers[{index}]' must be an object, found {_json_type(layer)}"
        if not isinstance(layer.get("class_name"), str):
            found = _json_type(layer.get("class_name"))
            return f"'config.layers[{index}].class_name' must be a string, found {found}"
        if not isinstance(layer.get("config", {}), dict):
            found = _json_type(layer.get("config"))
            return f"'config.layers[{index}].config' must be an object, found {found}"
    return None


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "nothing"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)
