"""`tfstack reproduce RUN_ID`: the same config, data and seed give the same metrics on CPU."""

import numpy as np
import pytest
import test_pipeline
from PIL import Image
from test_pipeline import _runs, _sh, assert_complete_run

from tfstack import cli, tracking
from tfstack.pipeline import reproduce
from tfstack.png_files import write_gray_png

project = test_pipeline.project  # the fixture: a shrunk git + DVC copy of the project


def test_metric_differences_exclude_timings_and_compare_histories():
    source = {"test_accuracy": 0.5, "loss": 1.0, "stage_seconds_train": 3.0}
    same = reproduce.metric_differences(
        source,
        {"test_accuracy": 0.5, "loss": 1.0, "stage_seconds_train": 9.0},
        {"loss": ([(0, 2.0), (1, 1.0)], [(0, 2.0), (1, 1.0)])},
    )
    assert [row.name for row in same] == ["loss", "test_accuracy"]
    assert all(row.identical for row in same)
    text = reproduce.differences_text(same)
    assert "2 epochs identical" in text and "all 2 metrics match exactly" in text
    moved = reproduce.metric_differences(
        source,
        {"test_accuracy": 0.5, "loss": 1.0},
        {"loss": ([(0, 2.0), (1, 1.0)], [(0, 2.5), (1, 1.0)])},
    )
    assert not moved[0].identical and moved[0].max_history_difference == pytest.approx(0.5)
    assert "1 of 2 metrics differ" in reproduce.differences_text(moved)


@pytest.mark.slow
def test_reproduce_gives_identical_metrics_and_refuses_other_data(project, monkeypatch, capsys):
    # The source run, in its own process; an adapter with fresh weights, built after seeding.
    _sh(project, "tfstack", "run", "experiment=wide_head", "schedule=two_phase")
    client, runs = _runs(project)
    (source,) = runs
    assert "Dense" in source.data.tags["adapter"]
    logged = tracking.read_artifact_text(
        f"sqlite:///{project / 'mlflow.db'}", source.info.run_id, "config.yaml"
    )
    assert "head_wide.keras" in logged and "two_phase" in logged
    # New code since the run: reproduce warns, and still matches on the same data.
    _sh(project, "git", "commit", "-q", "--allow-empty", "-m", "later code")
    monkeypatch.chdir(project)
    assert cli.main(["reproduce", source.info.run_id]) == 0
    captured = capsys.readouterr()
    assert "was made at commit" in captured.err
    assert "identical: all" in captured.out, captured.out
    client, runs = _runs(project)
    copy = runs[-1]
    assert copy.data.tags["reproduced_from"] == source.info.run_id
    assert_complete_run(client, copy, epochs=1, freeze="frozen")
    timings = ("stage_seconds_",)
    names = [name for name in source.data.metrics if not name.startswith(timings)]
    assert names and set(names) == {n for n in copy.data.metrics if not n.startswith(timings)}
    for name in names:
        before = [(m.step, m.value) for m in client.get_metric_history(source.info.run_id, name)]
        after = [(m.step, m.value) for m in client.get_metric_history(copy.info.run_id, name)]
        assert sorted(before) == sorted(after), name  # exactly, not approximately
    assert (project / "outputs" / "reproduce" / source.info.run_id / "evaluate").is_dir()

    # Other data: one changed PNG of the image folder is refused before any run starts.
    assert source.data.params["data.format"] == "images"
    [image] = sorted((project / "outputs" / "prepare" / "target" / "train" / "5").glob("*.png"))[:1]
    with Image.open(image) as opened:
        pixels = 255 - np.asarray(opened)
    write_gray_png(image, pixels)
    assert cli.main(["reproduce", source.info.run_id]) == 2
    err = capsys.readouterr().err
    assert "data.path=outputs/prepare/target has hash" in err and "Refusing" in err
    assert len(_runs(project)[1]) == 2


@pytest.mark.slow
def test_reproduce_needs_the_logged_config(tmp_path, monkeypatch, capsys):
    uri = tracking.default_tracking_uri(tmp_path)
    run_id = tracking.start_run(uri, "tfstack", tags={"freeze": "joint"})
    tracking.end_run(run_id)
    monkeypatch.chdir(tmp_path)
    conf = str(test_pipeline.ROOT / "conf")
    assert cli.main(["reproduce", run_id, f"tracking.uri={uri}", "--config-dir", conf]) == 2
    assert "has no config.yaml artifact" in capsys.readouterr().err
    assert cli.main(["reproduce", "f00", f"tracking.uri={uri}", "--config-dir", conf]) == 2
    assert "run f00 does not exist" in capsys.readouterr().err
