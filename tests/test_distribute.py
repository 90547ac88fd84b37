"""Distribution: mirrored training matches one device; multi-worker is refused clearly."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_pipeline import project  # noqa: F401 (the shrunk project-copy fixture)

from tfstack.distribute import is_chief, make_strategy
from tfstack.errors import ConfigError

TESTS = Path(__file__).resolve().parent

# Logical CPU devices must be configured before TensorFlow starts, so this runs in a fresh process.
MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from tfstack.distribute import make_strategy
    strategy = make_strategy("mirrored", cpu_replicas=2)
    import keras, tensorflow as tf
    from conftest import make_base, make_data, make_head
    from tfstack.freezing import FreezePolicy
    from tfstack.schedules import make_schedule
    from tfstack.stacking import build_stacked
    from tfstack.training import run_schedule

    def train(strategy):
        keras.utils.set_random_seed(0)
        x, y = make_data(64)
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        with strategy.scope():
            model = build_stacked("functional", make_base(), make_head()).model
            phases = make_schedule(
                "two_phase", epochs=2, lr=1e-2, optimizer="adam", freeze=FreezePolicy("frozen")
            )
            results = run_schedule(
                model, phases, data, loss="sparse_categorical_crossentropy",
                feature_extractors=["base"], verbose=0,
            )
        return {{
            "replicas": strategy.num_replicas_in_sync,
            "loss": [v for r in results for v in r.history["loss"]],
            "trainable": [r.counts.trainable for r in results],
        }}

    single = train(tf.distribute.get_strategy())
    print(json.dumps({{"mirrored": train(strategy), "single": single}}))
    """
)


def test_mirrored_over_two_cpu_replicas_matches_one_device():
    script = MIRRORED_SCRIPT.format(tests=str(TESTS))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    mirrored, single = result["mirrored"], result["single"]
    assert mirrored["replicas"] == 2 and single["replicas"] == 1
    # Both phases ran under the strategy: frozen head first, then the top of the base.
    assert mirrored["trainable"] == single["trainable"] and mirrored["trainable"][0] == 27
    assert mirrored["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_multi_worker_is_refused_with_the_upstream_issue(monkeypatch):
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"index": 0}}),
    )
    with pytest.raises(ConfigError, match="keras-team/keras#20585") as err:
        make_strategy("multi_worker")
    assert "distribute=mirrored" in str(err.value)


def test_unknown_kind_and_default_strategy():
    with pytest.raises(ConfigError, match="distribute='tpu'"):
        make_strategy("tpu")
    assert is_chief(make_strategy("none"))


@pytest.mark.slow
def test_tfstack_run_mirrored_matches_single_device_and_is_tracked(project):  # noqa: F811
    from test_pipeline import _runs, _sh, assert_complete_run

    for kind, replicas in (("none", 0), ("mirrored", 2)):
        _sh(
            project,
            "tfstack",
            "run",
            f"distribute={kind}",
            f"distribute.cpu_replicas={replicas}",
            "schedule=two_phase",
        )
    client, runs = _runs(project)
    single, mirrored = runs
    assert_complete_run(client, mirrored, epochs=1, freeze="frozen")
    assert mirrored.data.tags["distribute"] == "mirrored"
    assert mirrored.data.metrics["replicas"] == 2
    # Tolerance: same seed and data; only the order of the cross-replica sum may differ.
    assert mirrored.data.metrics["test_accuracy"] == pytest.approx(
        single.data.metrics["test_accuracy"], abs=1e-6
    )
    assert mirrored.data.metrics["test_loss"] == pytest.approx(
        single.data.metrics["test_loss"], rel=1e-4
    )
