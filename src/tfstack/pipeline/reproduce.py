"""Re-run a tracked run from the exact config it logged, and report how the metrics differ.

Every pipeline run logs its resolved config as the artifact ``config.yaml`` (params are flattened
strings, so they cannot rebuild it). ``reproduce`` reads it back, refuses when the data no longer
hashes to the run's ``data_hash`` tag, warns when the code's commit differs from the run's
``git_commit``, runs the pipeline into ``<output_dir>/reproduce/<run id>/`` (emptied first, so
no earlier checkpoint is resumed) as a new run tagged ``reproduced_from=<run id>``, and compares
every metric, per-epoch histories included. On CPU with op determinism (``train.deterministic``,
the default) the same seed gives identical metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from tfstack.errors import DataError, TfstackError
from tfstack.pipeline.config import validate
from tfstack.pipeline.schema import Config

logger = logging.getLogger(__name__)

REPRODUCED_FROM_TAG = "reproduced_from"
# Wall-clock timings differ on every run; they are not part of what reproduces.
TIMING_PREFIXES = ("stage_seconds_",)


class ReproduceError(TfstackError):
    """A run cannot be re-run as it was (no logged config, or different data)."""


@dataclass
class MetricDifference:
    """One metric of the source run against the reproduction (latest values and histories)."""

    name: str
    source: float | None
    reproduced: float | None
    steps: int = 1
    max_history_difference: float | None = 0.0

    @property
    def difference(self) -> float | None:
        if self.source is None or self.reproduced is None:
            return None
        return self.reproduced - self.source

    @property
    def identical(self) -> bool:
        return (
            self.source is not None
            and _same(self.source, self.reproduced)
            and self.max_history_difference == 0.0
        )


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return False
    return a == b or (math.isnan(a) and math.isnan(b))


def history_difference(
    source: Sequence[tuple[int, float]], reproduced: Sequence[tuple[int, float]]
) -> float | None:
    """The largest absolute difference between two per-step histories; None if steps differ."""
    a, b = dict(source), dict(reproduced)
    if set(a) != set(b):
        return None
    diffs = [0.0 if _same(a[s], b[s]) else abs(a[s] - b[s]) for s in a]
    return max(diffs, default=0.0)


def metric_differences(
    source: Mapping[str, float],
    reproduced: Mapping[str, float],
    histories: Mapping[str, tuple[Sequence, Sequence]] | None = None,
) -> list[MetricDifference]:
    """Compare two runs' metrics (timings excluded), with their histories when given.

    Args:
        source: the source run's latest metric values.
        reproduced: the reproduction's latest metric values.
        histories: metric name -> (source history, reproduced history) of ``(step, value)``.
    """
    names = sorted(
        name for name in set(source) | set(reproduced) if not name.startswith(TIMING_PREFIXES)
    )
    rows = []
    for name in names:
        row = MetricDifference(name, source.get(name), reproduced.get(name))
        if histories and name in histories:
            before, after = histories[name]
            row.steps = max(len(before), len(after))
            row.max_history_difference = history_difference(before, after)
        rows.append(row)
    return rows


def differences_text(rows: Sequence[MetricDifference]) -> str:
    """The metric differences as an aligned table and a one-line verdict."""
    lines = [f"  {'metric':<26} {'source':>14} {'reproduced':>14} {'difference':>12}  history"]
    for row in rows:
        source = "-" if row.source is None else f"{row.source:.6g}"
        reproduced = "-" if row.reproduced is None else f"{row.reproduced:.6g}"
        diff = "-" if row.difference is None else f"{row.difference:+.3g}"
        if row.steps <= 1:
            history = ""
        elif row.max_history_difference is None:
            history = "different epochs"
        elif row.max_history_difference == 0:
            history = f"{row.steps} epochs identical"
        else:
            history = f"{row.steps} epochs, max diff {row.max_history_difference:.3g}"
        lines.append(f"  {row.name:<26} {source:>14} {reproduced:>14} {diff:>12}  {history}")
    same = sum(row.identical for row in rows)
    if same == len(rows):
        lines.append(f"  identical: all {len(rows)} metrics match exactly (timings excluded)")
    else:
        lines.append(f"  {len(rows) - same} of {len(rows)} metrics differ (timings excluded)")
    return "\n".join(lines)


def logged_config(uri: str, run: Mapping) -> Config:
    """The validated config a run logged as ``config.yaml``.

    Raises:
        ReproduceError: the run has no such artifact.
    """
    from tfstack import tracking
    from tfstack.pipeline.run_log import CONFIG_ARTIFACT

    text = tracking.read_artifact_text(uri, run["run_id"], CONFIG_ARTIFACT)
    if text is None:
        raise ReproduceError(
            f"run {run['run_id']} has no {CONFIG_ARTIFACT} artifact (it was logged before tfstack "
            "recorded the resolved config), so it cannot be re-run exactly. Its params hold the "
            "config flattened: re-run it with `tfstack run` and the matching overrides."
        )
    return validate(OmegaConf.create(text), source=f"run {run['run_id']}'s {CONFIG_ARTIFACT}")


def check_inputs(config: Config, root: Path, run: Mapping) -> list[str]:
    """Refuse when the data differ from the run's; return warnings (other code, no hash).

    Raises:
        ReproduceError: the data file hashes differently from the run's ``data_hash`` tag.
        DataError: the data file is missing.
    """
    from tfstack.pipeline.inputs import data_hash
    from tfstack.pipeline.paths import Paths
    from tfstack.pipeline.run_log import git_commit

    warnings = []
    tags = run["tags"]
    data_path = Path(config.data.path)
    data_path = data_path if data_path.is_absolute() else root / data_path
    if not (data_path.is_file() or config.data.format != "npz" and data_path.exists()):
        raise DataError(
            f"data.path={config.data.path} does not exist ({data_path}); run {run['run_id']} "
            "trained on it. Restore it (dvc pull / dvc checkout) and try again."
        )
    logged = tags.get("data_hash")
    if logged is None:
        warnings.append(f"run {run['run_id']} has no data_hash tag: the data cannot be checked.")
    else:
        current = data_hash(config, Paths(root=root, out=root / config.output_dir))
        if current != logged:
            raise ReproduceError(
                f"data.path={config.data.path} has hash {current}, but run {run['run_id']} "
                f"trained on data with hash {logged}. Refusing to reproduce on other data: restore "
                "that version (git checkout <its commit> -- data.dvc && dvc checkout, or dvc pull)."
            )
    logged_commit, commit = tags.get("git_commit"), git_commit(root)
    if logged_commit and commit and logged_commit != commit:
        warnings.append(
            f"run {run['run_id']} was made at commit {logged_commit[:12]}, this checkout is at "
            f"{commit[:12]}: code changes may change the metrics "
            f"(git checkout {logged_commit[:12]} to re-run the same code)."
        )
    return warnings


@dataclass
class Reproduction:
    """A reproduction: the source and new run ids, the warnings and the metric differences."""

    source_run_id: str
    run_id: str | None
    uri: str
    warnings: list[str] = field(default_factory=list)
    differences: list[MetricDifference] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return bool(self.differences) and all(row.identical for row in self.differences)


def reproduce(
    run_id: str,
    *,
    uri: str,
    root: Path,
    experiment: str | None = None,
    output_dir: str = "outputs",
    warn=logger.warning,
) -> Reproduction:
    """Re-run ``run_id`` from its logged config into a new run and compare the metrics.

    Args:
        run_id: the run to reproduce.
        uri: the tracking store holding it; the new run goes there too.
        root: the project root (relative data and component paths resolve against it).
        experiment: the new run's experiment; None uses the source run's.
        output_dir: the current ``output_dir``; outputs go to ``<output_dir>/reproduce/<run id>``
            and the demo's inputs, when missing, are made under it as ``tfstack run`` does.
        warn: called with each warning before the run starts.

    Raises:
        ReproduceError: no logged config, or the data differ from the run's.
        TfstackError: whatever the pipeline raises (the new run then ends FAILED).
    """
    from tfstack import pipeline, tracking

    source = tracking.get_run(uri, run_id)
    config = logged_config(uri, source)
    config.tracking = dataclasses.replace(
        config.tracking,
        enabled=True,
        uri=uri,
        experiment=experiment or source["experiment"],
        run_name=f"reproduce {source['run_name'] or run_id}",
    )
    demo = dataclasses.replace(config, output_dir=output_dir)
    pipeline.ensure_demo_inputs(demo, pipeline.Paths.from_config(demo, root))
    warnings = check_inputs(config, root, source)
    for message in warnings:
        warn(message)
    config.output_dir = str(Path(output_dir) / "reproduce" / run_id)
    paths = pipeline.Paths.from_config(config, root)
    # A fresh start: an earlier reproduction's checkpoint must not be resumed.
    shutil.rmtree(paths.out, ignore_errors=True)
    run, _ = pipeline.run_all(config, paths, tags={REPRODUCED_FROM_TAG: run_id})
    new = tracking.get_run(uri, run.run_id)
    names = set(source["metrics"]) | set(new["metrics"])
    histories = {
        name: (
            tracking.metric_history(uri, run_id, name),
            tracking.metric_history(uri, run.run_id, name),
        )
        for name in names
        if not name.startswith(TIMING_PREFIXES)
    }
    return Reproduction(
        source_run_id=run_id,
        run_id=run.run_id,
        uri=uri,
        warnings=warnings,
        differences=metric_differences(source["metrics"], new["metrics"], histories),
    )
