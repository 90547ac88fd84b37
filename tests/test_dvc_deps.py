"""DVC tracks the user's own files: conf/'s ``dvc_deps`` lists them for dvc.yaml's stages.

``dvc_deps`` is resolved by the ``tfstack_dep`` resolver, which Hydra's plugin scan registers in
any process that composes conf/: `tfstack run`, `tfstack params`, and DVC's own composition of
params.yaml in `dvc exp run`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import keras
import pytest
import yaml
from project_copy import ROOT, dvc_project, env, sh

from tfstack.pipeline.compose import compose_yaml


def composed_deps(*overrides: str) -> dict:
    return yaml.safe_load(compose_yaml(ROOT / "conf", list(overrides)))["dvc_deps"]


def test_the_demo_depends_on_its_own_files():
    assert composed_deps() == {
        "data": "outputs/prepare/target",
        "base": "outputs/pretrain/base.keras",
        "base_weights": "params.yaml",
        "head": "outputs/pretrain/head.keras",
        "head_weights": "params.yaml",
    }


def test_the_users_files_are_dependencies_and_what_is_not_a_file_stands_as_params():
    deps = composed_deps(
        "data=npz",
        "data.path=mine/data.npz",
        "components.base.path=keras_applications:MobileNetV2",
        "components.base.weights=imagenet",
        "components.head.path=models/head.keras",
        "components.head.weights=models/head.weights.h5",
    )
    assert deps == {
        "data": "mine/data.npz",
        "base": "params.yaml",
        "base_weights": "params.yaml",
        "head": "models/head.keras",
        "head_weights": "models/head.weights.h5",
    }


def test_hydras_plugin_scan_registers_the_resolver_in_a_fresh_process():
    """What DVC does before composing: `Plugins.instance()`, nothing of tfstack imported."""
    script = (
        "from hydra.core.plugins import Plugins; Plugins.instance(); "
        "from omegaconf import OmegaConf; import sys; "
        "print(OmegaConf.has_resolver('tfstack_dep'), 'tfstack.pipeline' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env(), capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["True", "False"]


def _head_with_other_weights(source, destination) -> None:
    model = keras.saving.load_model(source, compile=False)
    model.set_weights([w + 1.0 for w in model.get_weights()])
    model.save(destination)


@pytest.mark.slow
def test_dvc_exp_run_tracks_a_head_file_and_notices_it_replaced_in_place(template, tmp_path):
    project = dvc_project(template, tmp_path / "dvc")
    (project / "models").mkdir()
    head = project / "models" / "head.keras"
    _head_with_other_weights(project / "outputs/pretrain/head.keras", head)
    # DVC composes params.yaml itself (hydra.enabled), in its own process, with the override.
    sh(project, "dvc", "exp", "run", "-S", "components.head.path=models/head.keras", "build")
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["dvc_deps"]["head"] == "models/head.keras"
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert "models/head.keras" in [dep["path"] for dep in lock["stages"]["build"]["deps"]]
    assert "models/head.keras" not in sh(project, "dvc", "status", "build").stdout

    _head_with_other_weights(head, head)  # the same path, new bytes
    status = sh(project, "dvc", "status", "build").stdout
    assert "modified:" in status and "models/head.keras" in status, status


def test_every_config_group_the_build_bakes_into_stacked_keras_is_a_build_param():
    # `dvc exp run -S preprocess=rescale` changes params.yaml only: a group missing here would
    # leave a stale stacked.keras that DVC calls up to date.
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = set(stages["build"]["params"])
    for group in ["components", "stacking", "preprocess", "augment", "data", "train.precision"]:
        assert group in params, group


@pytest.mark.slow
def test_the_demo_stages_run_only_upstream_of_the_demos_files(template, tmp_path):
    """`dvc repro evaluate` (make run) runs prepare and pretrain only when their outputs are the
    configured data or components; with the user's own files they stay out, even out of date."""
    project = dvc_project(template, tmp_path / "dvc")
    shutil.copytree(project / "outputs/prepare/target", project / "mine")
    (project / "models").mkdir()
    for name in ("base.keras", "head.keras"):
        shutil.copy2(project / "outputs/pretrain" / name, project / "models" / name)
    stale_demo = "demo.target_train_per_class=9"  # makes prepare and pretrain out of date
    own_files = [
        "data=images",
        "data.path=mine",
        "data.color_mode=grayscale",
        "components.base.path=models/base.keras",
        "components.head.path=models/head.keras",
    ]

    sh(project, "tfstack", "params", *own_files, stale_demo)
    # What `dvc repro evaluate` would run: evaluate and the changed stages upstream of it.
    status = json.loads(sh(project, "dvc", "status", "--with-deps", "evaluate", "--json").stdout)
    assert {"build", "evaluate"} <= set(status), status
    assert "prepare" not in status and "pretrain" not in status, status
    assert "prepare" in json.loads(sh(project, "dvc", "status", "--json").stdout)  # stale

    sh(project, "tfstack", "params", stale_demo)  # the demo's own files again
    status = json.loads(sh(project, "dvc", "status", "--with-deps", "evaluate", "--json").stdout)
    assert {"prepare", "pretrain", "build", "evaluate"} <= set(status), status
