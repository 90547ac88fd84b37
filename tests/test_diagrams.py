"""Architecture diagrams (README, "What every MLflow run records"): pictures that open, with the
components as named boxes, each layer's shapes and trainable flag, and one diagram per phase
whose trainable set changes. The pipeline's runs log them (tests/test_pipeline.py)."""

import html
import re
import shutil

import keras
import numpy as np
import pytest
from conftest import make_base, make_head
from matplotlib import image

from tfstack import cli
from tfstack.diagrams import draw, draw_phases, missing_tools
from tfstack.freezing import FreezePolicy
from tfstack.schedules import make_schedule
from tfstack.stacking import build_stacked

pytestmark = pytest.mark.skipif(
    missing_tools() is not None, reason=f"no diagrams here: {missing_tools()}"
)


@pytest.fixture
def stacked():
    return build_stacked("sequential", make_base(), make_head()).model


def opens_as_picture(path) -> np.ndarray:
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    return pixels


def test_the_diagram_opens_and_shows_components_layers_shapes_and_trainable_flags(
    stacked, tmp_path
):
    files = draw(stacked, tmp_path / "stacked")
    assert [f.name for f in files] == ["stacked.png", "stacked.svg"]
    opens_as_picture(files[0])
    svg = html.unescape(files[1].read_text())
    # Nested components are boxes named after them, with every layer inside.
    for text in ["base", "head", "conv1", "bn2", "features", "logits", "(None, 8, 8, 4)"]:
        assert text in svg, text
    assert "Trainable" in svg
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"


def test_one_diagram_per_phase_whose_trainable_set_changes(stacked, tmp_path):
    phases = make_schedule(
        "two_phase", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy("frozen")
    )
    files = draw_phases(stacked, phases, tmp_path, feature_extractors=["base"])
    assert [f.name for f in files] == ["phase_0_head.svg", "phase_1_fine_tune.svg"]
    head_svg, fine_tune_svg = (html.unescape(f.read_text()) for f in files)
    # The caption names the phase and its trainable count; the flags follow the phase.
    head_count = sum(int(np.prod(w.shape)) for w in stacked.get_layer("head").weights)
    assert re.search(rf"phase 0 'head': freeze=frozen, {head_count:,} trainable", head_svg)
    assert "phase 1 'fine_tune'" in fine_tune_svg
    assert head_svg.count("Non-trainable") > fine_tune_svg.count("Non-trainable")


def test_phases_that_train_the_same_layers_share_one_diagram(stacked, tmp_path):
    phases = make_schedule(
        "single", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy("joint")
    )
    phases = [phases[0], phases[0]]
    files = draw_phases(stacked, phases, tmp_path, feature_extractors=["base"])
    assert [f.name for f in files] == ["phase_0_train.svg"]


def test_without_graphviz_there_is_one_warning_and_no_file(stacked, tmp_path, monkeypatch, caplog):
    python_only = tmp_path / "bin"
    python_only.mkdir()
    monkeypatch.setenv("PATH", str(python_only))  # no `dot` on the PATH
    assert missing_tools().startswith("Graphviz's `dot` program is not installed")
    assert draw(stacked, tmp_path / "stacked") == []
    assert not list(tmp_path.glob("stacked*"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "apt-get install graphviz" in warnings[0]


def test_a_crashing_dot_costs_the_picture_not_the_run(stacked, tmp_path, monkeypatch, caplog):
    # Graphviz's dot killed mid-layout (SIGABRT, seen on an overloaded machine): a warning per
    # picture, no file and no temporary left, and draw returns instead of raising.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dot = bin_dir / "dot"
    script = 'case "$1" in -V|-Tps) exit 0;; esac'  # Keras's check passes; layouts die
    dot.write_text(f"#!/bin/sh\n{script}\nkill -ABRT $$\n")
    dot.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert missing_tools() is None
    out = tmp_path / "out"
    out.mkdir()
    assert draw(stacked, out / "stacked") == []
    assert list(out.iterdir()) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("Graphviz's dot failed" in w for w in warnings), warnings
    # A dot that dies in Keras's own check too: one line saying so, instead of a traceback.
    dot.write_text("#!/bin/sh\nkill -ABRT $$\n")
    assert missing_tools().startswith("Graphviz's `dot` program failed (")


def test_inspect_plot_writes_the_diagram_or_says_in_one_line_why_not(
    stacked, tmp_path, capsys, monkeypatch
):
    stacked.save(tmp_path / "stacked.keras")
    model = str(tmp_path / "stacked.keras")
    assert cli.main(["inspect", model, "--plot", str(tmp_path / "arch.png")]) == 0
    assert f"== diagram: {tmp_path / 'arch.png'}" in capsys.readouterr().out
    opens_as_picture(tmp_path / "arch.png")
    assert not (tmp_path / "arch.svg").exists()

    assert cli.main(["inspect", model, "--plot", str(tmp_path / "arch.gif")]) == 2
    assert "cannot write .gif diagrams. Give a .png, .svg or .pdf" in capsys.readouterr().err

    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("dot") is None
    assert cli.main(["inspect", model, "--plot", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "Graphviz's `dot` program is not installed" in err and "leave out --plot" in err
    assert not (tmp_path / "b.png").exists()


def test_a_mixed_dtype_model_shows_each_layers_dtype(tmp_path):
    inputs = keras.Input((4,), dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(1 / 255, name="rescale")(inputs)
    outputs = keras.layers.Dense(2, name="out")(x)
    files = draw(keras.Model(inputs, outputs), tmp_path / "m", formats=["svg"])
    svg = files[0].read_text()
    assert "uint8" in svg and "float32" in svg


def test_the_same_architecture_gives_the_same_files_and_is_laid_out_once(tmp_path, monkeypatch):
    # A dot that notes each call: two jobs of a sweep drawing the same architecture run it once
    # per format, and their files are byte-identical (node ids are numbered, not addresses).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    wrapper = bin_dir / "dot"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {calls}\nexec {shutil.which("dot")} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    first, second = (tmp_path / "job1", tmp_path / "job2")
    models = []
    for out in (first, second):
        out.mkdir()
        keras.utils.set_random_seed(0)
        models.append(build_stacked("sequential", make_base(), make_head()).model)
        draw(models[-1], out / "stacked")
    assert models[0] is not models[1]
    for suffix in ("png", "svg"):
        assert (first / f"stacked.{suffix}").read_bytes() == (
            second / f"stacked.{suffix}"
        ).read_bytes()
    rendered = [line for line in calls.read_text().split() if line in ("-Tpng", "-Tsvg")]
    assert sorted(rendered) == ["-Tpng", "-Tsvg"]
    # The picture is Graphviz's own of Keras's diagram: only the SVG's node titles differ.
    dot = keras.utils.model_to_dot(
        models[1],
        show_shapes=True,
        show_dtype=True,
        show_layer_names=True,
        expand_nested=True,
        show_trainable=True,
        dpi=96,
    )
    dot.write(str(tmp_path / "keras.png"), format="png")
    assert (tmp_path / "keras.png").read_bytes() == (second / "stacked.png").read_bytes()
    titles = re.findall(r"<title>([^<]*)</title>", (second / "stacked.svg").read_text())
    assert "n0" in titles and "n1" in titles
    assert not [t for t in titles if re.search(r"\d{8,}", t)]  # no memory address left
