"""tracking.tensorboard (issue 14, point 5): Keras TensorBoard logs on one global step axis.

The logs of a run through `tfstack run`, and their copy in the MLflow run, are checked by the
end-to-end test of tests/test_user_callbacks.py (one run for both features).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from project_copy import VENV_BIN, env

ROOT = Path(__file__).resolve().parents[1]

# Makes `import tensorboard` fail, as in an environment without the package.
BLOCKER = """
import sys


class _NoTensorboard:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, _NoTensorboard())
"""


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the scalar summaries in an event file directory."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
        if tag != "keras"
    }


@pytest.mark.slow  # two tiny phases with caching: seconds
def test_two_phases_log_on_one_global_step_axis(tmp_path):
    import keras
    from conftest import make_base, make_data, make_head

    from tfstack import ArrayDataset, FreezePolicy, build_stacked, run_schedule
    from tfstack.schedules import Phase
    from tfstack.tensorboard_logs import ScheduleTensorBoard

    keras.utils.set_random_seed(0)
    stack = build_stacked("sequential", make_base(), make_head())
    train = ArrayDataset(*make_data(32), batch_size=16, shuffle=True, seed=0)  # 2 batches
    val = ArrayDataset(*make_data(16, seed=1), batch_size=16, shuffle=False, seed=0)
    results = run_schedule(
        stack.model,
        [
            Phase("head", 2, FreezePolicy("frozen"), 0.01),
            Phase("fine_tune", 2, FreezePolicy("joint"), 0.001),
        ],
        train,
        val,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        feature_extractors=stack.feature_extractors,
        callbacks=[ScheduleTensorBoard(str(tmp_path / "tb"))],
        verbose=0,
        cache_frozen=True,
    )
    assert [r.cached for r in results] == [True, False]
    history = {k: v for r in results for k, v in r.history.items() if k == "loss"}
    train_logs = _scalars(tmp_path / "tb" / "train")
    val_logs = _scalars(tmp_path / "tb" / "validation")
    assert [step for step, _ in train_logs["epoch_loss"]] == [0, 1, 2, 3]
    assert [step for step, _ in train_logs["epoch_accuracy"]] == [0, 1, 2, 3]
    assert [step for step, _ in val_logs["epoch_loss"]] == [0, 1, 2, 3]
    # The last epoch's loss is the history's (the fine-tuning phase's last epoch).
    assert train_logs["epoch_loss"][-1][1] == pytest.approx(history["loss"][-1], rel=1e-5)
    # Validation after epoch e is at global batch (e + 1) * 2, not at the phase's optimizer step.
    steps = [step for step, _ in val_logs["evaluation_loss_vs_iterations"]]
    assert steps == [2, 4, 6, 8]
    # The graph summary is the full stacked model's, also written in the cached phase.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "train"), size_guidance={"tensors": 0})
    events.Reload()
    summary = json.loads(events.Tensors("keras")[0].tensor_proto.string_val[0])
    assert summary["config"]["name"] == stack.model.name


@pytest.mark.slow  # a subprocess
def test_without_the_package_the_run_fails_first_in_one_line(tmp_path):
    """With `tensorboard` not importable, `tfstack run tracking.tensorboard=true` stops at
    validation: exit 2, one line naming the extra, nothing written, no MLflow store."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    project = tmp_path / "project"
    shutil.copytree(ROOT / "conf", project / "conf")
    environment = env()
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(blocker), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    done = subprocess.run(
        [str(VENV_BIN / "tfstack"), "run", "tracking.tensorboard=true"],
        cwd=project,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("tfstack: error: ")]
    assert lines == [
        "tfstack: error: tracking.tensorboard=true needs the tensorboard package, which is not "
        "installed. Install tfstack's extra (pip install 'tfstack[tensorboard]'), or set "
        "tracking.tensorboard=false."
    ]
    assert sorted(p.name for p in project.iterdir()) == ["conf"]
