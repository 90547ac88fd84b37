"""Fuzz test: a real `.keras` and a real `.h5`, damaged in 200+ seeded ways each.

Every damaged file goes through the loader (`load_component`) and `tfstack inspect` (in process,
through `tfstack.cli.main`, the code the console script runs). Each must either be refused with
exactly one `tfstack: error:` line naming the file and no traceback (exit code 2), or load as a
working model (a harmless mutation, or a valid config with other values), counted separately.
A few real `tfstack inspect` processes and one `tfstack run` with a damaged component check the
same from the outside, and that the run leaves no MLflow run RUNNING.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from damaged_files import archive_member, h5_with_attribute, rewrite_archive, save_base
from mlflow.tracking import MlflowClient
from project_copy import tfstack

from tfstack import cli
from tfstack.components import load_component
from tfstack.errors import ComponentError

SEED = 11
WRONG_VALUES = [None, 0, -1, 2**70, 1e308, -1e308, "", "x" * 300, [], {}, True, [[[[[]]]]]]
KERAS_CASES = 220  # at least 200 per file, as the issue asks
H5_CASES = 220


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("fuzz_saved"))


def json_paths(value, prefix=()):
    """Every path (tuple of keys and indices) into parsed JSON, the root excluded."""
    if isinstance(value, dict):
        children = value.items()
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        return
    for key, child in children:
        yield (*prefix, key)
        yield from json_paths(child, (*prefix, key))


def mutate_config(config: dict, rng: random.Random) -> str:
    """One seeded mutation of a model config, as JSON text (possibly no longer valid JSON)."""
    config = json.loads(json.dumps(config))
    kind = rng.choice(["wrong type", "wrong type", "delete", "deep", "huge number", "text"])
    if kind == "text":
        text = json.dumps(config)
        cut = rng.randrange(len(text))
        return (
            text[:cut]
            + rng.choice(["\udcff", "}", "]", '"', "\x00", "NaN", "{" * 5000])
            + (text[cut + 1 :])
        )
    path = rng.choice(list(json_paths(config)))
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "deep":
        parent[path[-1]] = "__deep__"
        depth = rng.choice([150, 3000])
        return json.dumps(config).replace('"__deep__"', "[" * depth + "]" * depth, 1)
    elif kind == "huge number":
        parent[path[-1]] = rng.choice([10**400, 1e308, -(2**63), 2**64])
    else:
        parent[path[-1]] = rng.choice(WRONG_VALUES)
    return json.dumps(config)


def damaged_bytes(data: bytes, kind: str, rng: random.Random) -> bytes:
    """The file's bytes cut short at a random length, or with 1 to 8 random bits flipped."""
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    damaged = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)


def damaged_keras(source: Path, directory: Path, count: int) -> list[tuple[str, Path]]:
    rng = random.Random(SEED)
    data = source.read_bytes()
    config = json.loads(archive_member(source, "config.json"))
    weights = archive_member(source, "model.weights.h5")
    members = ["config.json", "metadata.json", "model.weights.h5"]
    cases = []
    for index in range(count):
        path = directory / f"k{index:03d}.keras"
        kind = ["truncate", "flip", "config", "config", "member", "weights"][index % 6]
        if kind in ("truncate", "flip"):
            path.write_bytes(damaged_bytes(data, kind, rng))
        elif kind == "config":
            raw = mutate_config(config, rng).encode("utf-8", "surrogateescape")
            rewrite_archive(source, path, replace={"config.json": raw})
        elif kind == "member":
            member = rng.choice(members)
            if rng.random() < 0.5:
                rewrite_archive(source, path, drop=(member,))
            else:
                rewrite_archive(source, path, rename={member: member.upper()})
        else:
            cut = weights[: rng.randrange(len(weights))]
            flipped = bytearray(weights)
            flipped[rng.randrange(len(flipped))] ^= 0xFF
            replacement = rng.choice([cut, bytes(flipped), b"", b"not hdf5"])
            rewrite_archive(source, path, replace={"model.weights.h5": replacement})
        cases.append((kind, path))
    return cases


def damaged_h5(source: Path, directory: Path, count: int) -> list[tuple[str, Path]]:
    rng = random.Random(SEED + 1)
    data = source.read_bytes()
    with h5py.File(source) as file:
        config = json.loads(file.attrs["model_config"])
        datasets = []
        file.visititems(
            lambda name, item: datasets.append(name) if isinstance(item, h5py.Dataset) else None
        )
    cases = []
    for index in range(count):
        path = directory / f"h{index:03d}.h5"
        kind = ["truncate", "flip", "config", "config", "attribute", "dataset"][index % 6]
        if kind in ("truncate", "flip"):
            path.write_bytes(damaged_bytes(data, kind, rng))
        elif kind == "config":
            text = mutate_config(config, rng)
            if "\udcff" in text or "\x00" in text:  # not UTF-8, or NUL: fixed-length bytes
                value = np.bytes_(text.encode("utf-8", "surrogateescape"))
            else:
                value = text
            h5_with_attribute(source, path, value)
        elif kind == "attribute":
            name = rng.choice(["model_config", "model_config", "keras_version", "backend"])
            value = rng.choice(
                [7, 1.5, np.arange(3), b"\xff\xfe", "", np.array(["a", "b"], dtype=object)]
            )
            h5_with_attribute(source, path, value, name=name)
        else:
            path.write_bytes(data)
            with h5py.File(path, "r+") as file:
                name = rng.choice(datasets)
                if rng.random() < 0.5:
                    del file[name]
                else:
                    shape = file[name].shape
                    del file[name]
                    file[name] = np.zeros((*shape, 2), dtype="float32")
        cases.append((kind, path))
    return cases


def check_case(path: Path, *, trust_code: bool, inputs, expected, capsys) -> str:
    """Load and inspect one damaged file; return its outcome: refused, harmless or other values."""
    try:
        model = load_component(str(path), name="base", trust_code=trust_code)
        outcome = "loaded"
    except ComponentError as err:
        message = str(err)
        assert "\n" not in message and f"components.base.path={path}" in message, message
        outcome = "refused"
    if outcome == "loaded":
        predictions = np.asarray(model(inputs, training=False))
        same = predictions.shape == expected.shape and np.allclose(predictions, expected)
        outcome = "harmless" if same else "loaded, other values"
    capsys.readouterr()
    code = cli.main(["inspect", str(path), *(["--trust-code"] if trust_code else [])])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("tfstack: error:")]
    if outcome == "refused":
        assert code == 2 and len(errors) == 1 and str(path) in errors[0], (code, err[-3000:])
    else:
        assert code == 0 and not errors, (code, err[-3000:])
    return outcome


@pytest.mark.slow  # 440 cases: about 40 s alone, more on a busy machine
def test_damaged_keras_and_h5_files_fail_in_one_line_or_load(saved, tmp_path, capsys):
    keras_path, h5_path, inputs, expected = saved
    started = time.perf_counter()
    counts = {}
    # Legacy .h5 is loaded trusted: trust is point 1 of the issue, damage handling is this one.
    for fmt, cases, trust_code in (
        (".keras", damaged_keras(keras_path, tmp_path, KERAS_CASES), False),
        (".h5", damaged_h5(h5_path, tmp_path, H5_CASES), True),
    ):
        counter = Counter()
        for kind, path in cases:
            outcome = check_case(
                path, trust_code=trust_code, inputs=inputs, expected=expected, capsys=capsys
            )
            counter[f"{kind}: {outcome}"] += 1
        counts[fmt] = dict(sorted(counter.items()))
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n  fuzz: {KERAS_CASES} .keras + {H5_CASES} .h5 cases in {elapsed:.1f} s")
        for fmt, counter in counts.items():
            print(f"  {fmt}: {counter}")
    assert sum(counts[".keras"].values()) >= 200 and sum(counts[".h5"].values()) >= 200


@pytest.fixture(scope="module")
def damaged_samples(saved, tmp_path_factory):
    """One damaged file of each family the fuzz test makes, for real processes."""
    directory = tmp_path_factory.mktemp("samples")
    keras_path, h5_path, _, _ = saved
    config = json.loads(archive_member(keras_path, "config.json"))
    config["config"]["layers"] = {"not": "a list"}
    return [
        rewrite_archive(keras_path, directory / "deep.keras", replace={"config.json": b"[" * 5000}),
        rewrite_archive(
            keras_path, directory / "types.keras", replace={"config.json": json.dumps(config)}
        ),
        h5_with_attribute(h5_path, directory / "notjson.h5", "not json"),
        h5_with_attribute(h5_path, directory / "notstring.h5", 7),
    ]


@pytest.mark.slow
def test_real_tfstack_inspect_processes_print_one_line(damaged_samples, tmp_path):
    for path in damaged_samples:
        result = tfstack(tmp_path, "inspect", str(path), "--trust-code")
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("tfstack: error")]
        assert len(errors) == 1 and str(path) in errors[0], result.stderr[-3000:]


@pytest.mark.slow
def test_a_run_with_a_damaged_component_fails_in_one_line_and_leaves_no_run_running(
    damaged_samples, project
):
    damaged = damaged_samples[0]
    result = tfstack(project, "run", f"components.base.path={damaged}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("tfstack: error")]
    assert len(errors) == 1 and str(damaged) in errors[0], result.stderr[-3000:]
    db = project / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        statuses = [run.info.status for run in client.search_runs(experiments)]
        assert "RUNNING" not in statuses, statuses
