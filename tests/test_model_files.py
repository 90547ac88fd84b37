"""Bounded, validated reading of model files (tfstack.model_files), through `load_component`.

Each test saves a real tiny model with Keras, damages or inflates it, and checks what the user
sees: one `ComponentError` line naming the file (and, for sizes, the member, its size, the limit
and the variable that raises it). The memory tests load 1 GiB expansions in a subprocess and
compare its peak RSS with that of `python -c "import keras"` measured in the same test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest
from damaged_files import (
    GiB,
    archive_member,
    h5_with_attribute,
    h5_with_bomb_dataset,
    keras_with_bomb_weights,
    rewrite_archive,
    save_base,
    write_expanding_member,
)

from tfstack.components import load_component
from tfstack.errors import ComponentError, ConfigError
from tfstack.model_files import MAX_CONFIG_DEPTH, Limits

CONFIG_PREFIX = b'{"class_name": "Functional", "config": {"layers": ['
CONFIG_SUFFIX = b"]}}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("saved"))


def refused(path, *fragments: str, trust_code: bool = False) -> str:
    """Load `path`, expect one ComponentError line naming it and each fragment; return it."""
    with pytest.raises(ComponentError) as caught:
        load_component(str(path), name="base", trust_code=trust_code)
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in (f"components.base.path={path}", *fragments):
        assert fragment in message, message
    return message


def keras_with_config(saved, tmp_path, config: bytes | str, name: str = "bad.keras"):
    raw = config.encode() if isinstance(config, str) else config
    return rewrite_archive(saved[0], tmp_path / name, replace={"config.json": raw})


@pytest.mark.slow
def test_a_real_model_still_loads_and_predicts_the_same(saved):
    keras_path, h5_path, inputs, expected = saved
    for path in (keras_path, h5_path):
        model = load_component(str(path), name="base", trust_code=path.suffix == ".h5")
        np.testing.assert_allclose(model.predict(inputs, verbose=0), expected, rtol=1e-6)


def test_a_config_member_declared_beyond_the_limit_is_refused_before_reading(
    saved, tmp_path, monkeypatch
):
    monkeypatch.setenv("TFSTACK_MAX_MODEL_CONFIG_BYTES", "1MiB")
    path = write_expanding_member(
        tmp_path / "big.keras", "config.json", CONFIG_PREFIX, 2 << 20, CONFIG_SUFFIX
    )
    message = refused(path, "config.json is 2.0 MiB (2097152 bytes)", "limit of 1.0 MiB")
    assert "TFSTACK_MAX_MODEL_CONFIG_BYTES=" in message


def test_the_whole_model_limit_counts_every_member(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("TFSTACK_MAX_MODEL_BYTES", "10KiB")
    refused(saved[0], "its members in total", "limit of 10.0 KiB", "TFSTACK_MAX_MODEL_BYTES=")


def test_the_whole_model_limit_counts_every_h5_dataset(saved, monkeypatch):
    monkeypatch.setenv("TFSTACK_MAX_MODEL_BYTES", "100")
    refused(saved[1], "its datasets in total", "TFSTACK_MAX_MODEL_BYTES=", trust_code=True)


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5GiB"])
def test_a_limit_that_is_not_a_size_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("TFSTACK_MAX_MODEL_BYTES", value)
    with pytest.raises(ConfigError, match="TFSTACK_MAX_MODEL_BYTES=.* is not a size"):
        Limits.from_environment()


def test_limits_take_bytes_or_binary_units(monkeypatch):
    monkeypatch.setenv("TFSTACK_MAX_MODEL_CONFIG_BYTES", "2GiB")
    monkeypatch.setenv("TFSTACK_MAX_MODEL_BYTES", "12345")
    assert Limits.from_environment() == Limits(config_bytes=2 << 30, model_bytes=12345)


def test_a_weights_dataset_that_declares_a_gibibyte_over_a_kilobyte_is_refused(saved, tmp_path):
    keras_bomb = keras_with_bomb_weights(saved[0], tmp_path / "bomb.keras")
    refused(keras_bomb, "model.weights.h5", "declares 1.0 GiB", "decompression bomb")
    h5_bomb = h5_with_bomb_dataset(saved[1], tmp_path / "bomb.h5")
    refused(h5_bomb, "declares 1.0 GiB", "decompression bomb", trust_code=True)


def test_an_h5_model_config_longer_than_the_limit_is_refused(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("TFSTACK_MAX_MODEL_CONFIG_BYTES", "1KiB")
    fixed = h5_with_attribute(
        saved[1], tmp_path / "fixed.h5", np.bytes_(h5py.File(saved[1]).attrs["model_config"])
    )
    refused(fixed, "model_config is", "model config limit of 1.0 KiB", trust_code=True)
    variable = h5_with_attribute(saved[1], tmp_path / "variable.h5", "x" * 2048)
    refused(variable, "model_config is 2.0 KiB", trust_code=True)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (b"\xff\xfe{}", "is not UTF-8 text"),
        ("{not json", "is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply to parse"),
        (
            "[" * (MAX_CONFIG_DEPTH + 5) + "]" * (MAX_CONFIG_DEPTH + 5),
            "nested more than 100 levels deep",
        ),
        ("[1, 2]", "expected a JSON object at the top, found a list"),
        ('"Functional"', "found a string"),
        ('{"config": {}}', "'class_name' must be a string, found nothing"),
        ('{"class_name": 3, "config": {}}', "'class_name' must be a string, found a number"),
        ('{"class_name": "Functional", "config": []}', "'config' must be an object"),
        ('{"class_name": "Functional", "config": {"layers": 7}}', "'config.layers' must be a"),
        ('{"class_name": "Functional", "config": {"layers": [1]}}', "'config.layers[0]' must"),
        (
            '{"class_name": "Functional", "config": {"layers": [{"class_name": null}]}}',
            "'config.layers[0].class_name' must be a string",
        ),
        ('{"class_name": "Functional", "config": {"x": 1' + "0" * 5000 + "}}", "valid JSON"),
    ],
)
def test_a_damaged_keras_config_is_one_line_naming_the_file(saved, tmp_path, config, fragment):
    path = keras_with_config(saved, tmp_path, config)
    refused(path, "(config.json)", fragment)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("{not json", "is not valid JSON"),
        (np.int64(7), "attribute is not a string"),
        (np.array(["a", "b"], dtype=h5py.string_dtype()), "is an array of shape (2,)"),
        (np.bytes_(b'{"class_name": "\xff"}'), "is not UTF-8 text"),
        ('["Functional"]', "expected a JSON object at the top, found a list"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ],
)
def test_a_damaged_h5_model_config_is_one_line_naming_the_file(saved, tmp_path, value, fragment):
    path = h5_with_attribute(saved[1], tmp_path / "bad.h5", value)
    refused(path, fragment, trust_code=True)


def test_a_missing_or_renamed_member_is_named(saved, tmp_path):
    dropped = rewrite_archive(saved[0], tmp_path / "noconfig.keras", drop=("config.json",))
    refused(dropped, "expected a zip archive holding config.json, found ['metadata.json'")
    renamed = rewrite_archive(
        saved[0], tmp_path / "renamed.keras", rename={"model.weights.h5": "weights.bin"}
    )
    refused(renamed, "could not be loaded by Keras", "model.weights.h5")


def test_a_keras_error_spanning_many_lines_is_quoted_on_one(saved, tmp_path):
    config = json.loads(archive_member(saved[0], "config.json"))
    config["config"]["layers"][1]["class_name"] = "NoSuchLayer"
    path = keras_with_config(saved, tmp_path, json.dumps(config))
    refused(path, "could not be loaded by Keras", "NoSuchLayer")


# Peak memory: 1 GiB expansions, each loaded in a fresh process ------------------------------

# ru_maxrss survives exec (a child would report its parent's peak): read VmHWM instead.
PEAK_SCRIPT = """
import json, sys


def peak_mib():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


from tfstack.components import load_component
from tfstack.errors import TfstackError

print(json.dumps({"peak_mib": peak_mib(), "outcome": "imported"}), flush=True)
for path in sys.argv[1:]:
    try:
        load_component(path, name="base", trust_code=path.endswith(".h5"))
        outcome = "loaded"
    except TfstackError as err:
        outcome = "refused: " + str(err)
    print(json.dumps({"peak_mib": peak_mib(), "outcome": outcome}), flush=True)
"""
BASELINE_SCRIPT = PEAK_SCRIPT.split("from tfstack")[0] + "import keras\nprint(peak_mib())"


def peaks(paths) -> list[tuple[float, str]]:
    """Load each file in turn in one fresh process: (peak RSS so far in MiB, outcome) after each,
    the first entry after the imports."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == len(paths) + 1, result.stderr[-3000:]
    return [(report["peak_mib"], report["outcome"]) for report in reports]


@pytest.fixture(scope="module")
def expansions(saved, tmp_path_factory):
    """Small files that expand to 1 GiB, each a different way."""
    directory = tmp_path_factory.mktemp("expansions")
    json_bomb = write_expanding_member(
        directory / "json_bomb.keras", "config.json", CONFIG_PREFIX, GiB, CONFIG_SUFFIX
    )
    zeros_bomb_weights = directory / "weights_bomb.keras"
    with zipfile.ZipFile(saved[0]) as source:
        config = source.read("config.json")
    write_expanding_member(zeros_bomb_weights, "model.weights.h5", b"", GiB, b"")
    with zipfile.ZipFile(zeros_bomb_weights, "a") as archive:
        archive.writestr("config.json", config)
    return {
        "config.json of JSON whitespace": json_bomb,
        "model.weights.h5 member of spaces": zeros_bomb_weights,
        "model.weights.h5 dataset (gzip)": keras_with_bomb_weights(
            saved[0], directory / "dataset_bomb.keras"
        ),
        ".h5 dataset (gzip)": h5_with_bomb_dataset(saved[1], directory / "dataset_bomb.h5"),
    }


@pytest.mark.slow
def test_files_expanding_to_a_gibibyte_are_refused_in_bounded_memory(expansions, capsys):
    baseline = subprocess.run(
        [sys.executable, "-c", BASELINE_SCRIPT], capture_output=True, text=True, check=True
    )
    keras_alone = float(baseline.stdout.split()[-1])
    (imported, _), *loaded = peaks(list(expansions.values()))
    report = [
        f"python -c 'import keras': peak {keras_alone:.0f} MiB; tfstack imported: "
        f"{imported:.0f} MiB"
    ]
    failures = []
    for (kind, path), (peak, outcome) in zip(expansions.items(), loaded, strict=True):
        size = path.stat().st_size / (1 << 20)
        report.append(f"{kind} ({size:.1f} MiB file): peak {peak:.0f} MiB, {outcome[:120]}")
        if not outcome.startswith("refused: ") or str(path) not in outcome:
            failures.append(f"{kind}: {outcome}")
    # The peak over all of them: a small multiple of Keras's own, far below one expansion.
    if loaded[-1][0] > min(1.5 * keras_alone, keras_alone + 256):
        failures.append(f"peak {loaded[-1][0]:.0f} MiB against {keras_alone:.0f} MiB")
    with capsys.disabled():
        print("\n  " + "\n  ".join(report))
    assert not failures, failures
