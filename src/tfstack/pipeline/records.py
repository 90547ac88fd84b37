"""What the build and train stages record in the MLflow run, beside their output files.

The build's shape report (per-layer tables, summaries, the architecture diagram, the sha256 of
every component file, the adapters) is logged from the build's files, so a run whose build DVC
cached records the same. The train stage tags each phase: cached or not, its epochs, early
stopping's decisions, inference-mode layers and its learning-rate schedule.
"""

from __future__ import annotations

import json
from pathlib import Path

from tfstack.pipeline.run_log import RunLog


def shape_report(models: dict) -> dict:
    """Specs and per-layer tables of several models, JSON-ready."""
    from tfstack.shapes import input_specs, layer_table, output_specs

    return {
        name: {
            "inputs": [s.to_dict() for s in input_specs(model)],
            "outputs": [s.to_dict() for s in output_specs(model)],
            "layers": layer_table(model),
        }
        for name, model in models.items()
    }


def component_files(models: dict) -> dict:
    """Each component's file (or weights file) and its sha256, by component name.

    Components without one (a Keras application with random weights) are left out.
    """
    from tfstack.components import component_file
    from tfstack.file_hashes import sha256_of

    files = {name: component_file(model) for name, model in models.items()}
    return {name: {"path": path, "sha256": sha256_of(path)} for name, path in files.items() if path}


def log_build_report(run: RunLog, build_dir: Path) -> None:
    """Record the build's shape report and summaries in the run (from the build's files)."""
    report = json.loads((build_dir / "shapes.json").read_text(encoding="utf-8"))
    run.json(report["stacked"]["layers"], "shapes/stacked_layers.json")
    for name, component in report["components"].items():
        run.json(component["layers"], f"shapes/{name}_layers.json")
    run.json(report, "shapes/report.json")
    if "seconds" in report:
        # When DVC cached the build, this run did not time it; the report did.
        run.metrics({"stage_seconds_build": report["seconds"]})
    for summary in sorted(build_dir.glob("summary_*.txt")):
        run.text(summary.read_text(encoding="utf-8"), f"shapes/{summary.name}")
    run.files(
        [p for p in (build_dir / "stacked.png", build_dir / "stacked.svg") if p.exists()], "shapes"
    )
    if not run.run_id:
        return
    from tfstack import tracking

    tags = {}
    for name, file in report.get("component_files", {}).items():
        # Which bytes this run loaded: a file replaced in place gets another digest.
        tags[f"component.{name}.sha256"] = file["sha256"]
        tags[f"component.{name}.file"] = file["path"]
    if tags:
        tracking.log_tags(run.run_id, tags)
    if report.get("adapters"):
        described = "; ".join(
            f"{a['upstream']}->{a['downstream']}: "
            + ", ".join(layer["class_name"] for layer in a["layers"])
            for a in report["adapters"]
            if a["layers"]
        )
        if described:
            tracking.log_tags(run.run_id, {"adapter": described})


def log_phases(run: RunLog, results, model) -> None:
    """Tag each phase: cached or not (``phase.<i>.cache``: the shared feature cache's ``hit``,
    ``miss`` or ``off``; ``phase.<i>.cache_key``: its entries), its epochs (``first-last``, or
    ``none``) and, with early stopping, its ``stopped_epoch`` and ``best_epoch`` (also
    metrics), and the epoch whose weights the trained model holds (``weights_from_epoch``);
    and the frozen components whose random layers ran in inference mode
    (``phase.<i>.inference_mode``); and each phase's learning-rate schedule
    (``phase.<i>.lr_schedule``)."""
    from tfstack.tracking import log_tags

    tags = {}
    stopping = {}
    for r in results:
        tags[f"phase.{r.index}.cached"] = str(r.cached).lower()
        # The shared feature cache: hit, miss or off, and each split's entry key.
        tags[f"phase.{r.index}.cache"] = r.cache
        if r.cache_keys:
            keys = ",".join(f"{split}={key}" for split, key in r.cache_keys.items())
            tags[f"phase.{r.index}.cache_key"] = keys
        # The whole phase, also when this process ran only its last epochs.
        last = r.initial_epoch + r.epochs - 1
        tags[f"phase.{r.index}.epochs"] = f"{r.initial_epoch}-{last}" if r.epochs else "none"
        if r.early_stopping is not None:
            for key in ("stopped_epoch", "best_epoch"):
                value = getattr(r, key)
                tags[f"phase.{r.index}.{key}"] = "none" if value is None else str(value)
                if value is not None:
                    stopping[f"phase.{r.index}.{key}"] = value
    ran = [r for r in results if r.epochs]
    if ran and any(r.early_stopping is not None for r in results):
        last = ran[-1]
        restored = last.restored_epoch
        weights_from = restored if restored is not None else last.initial_epoch + last.epochs - 1
        tags["weights_from_epoch"] = str(weights_from)
        stopping["weights_from_epoch"] = weights_from
    tags.update(_inference_mode_tags(model, results))
    # Learning-rate schedules: each phase's, e.g. cosine(warmup_epochs=2, final_fraction=0.0).
    from tfstack.lr_schedules import describe

    tags.update({f"phase.{r.index}.lr_schedule": describe(r.lr_schedule) for r in results})
    log_tags(run.run_id, tags)
    if stopping:
        run.metrics(stopping)


def _inference_mode_tags(model, results) -> dict:
    """``phase.<i>.inference_mode``: per phase, the frozen components whose random or
    training-mode layers were switched off, and those layers (``base: dropout (Dropout)``)."""
    from tfstack.frozen_features import training_mode_layers

    return {
        f"phase.{r.index}.inference_mode": "; ".join(
            f"{name}: {', '.join(training_mode_layers(model.get_layer(name)))}"
            for name in r.inference_mode
        )
        for r in results
        if r.inference_mode
    }
