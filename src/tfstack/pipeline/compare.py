"""`tfstack compare`: read finished runs from the MLflow store, compare them, write and log.

The comparison itself is the library's (`tfstack.compare`: plain dicts in, rows, a verdict and
a figure out); this is the command's layer: it reads the runs and their validation histories
through `tfstack.tracking`, writes ``comparison.csv``, ``comparison.md`` and
``validation_curves.png`` and logs them to the sweep's parent run when there is one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tfstack.compare import (
    GROUP_BY,
    RANK_BY,
    VAL_METRIC,
    CompareError,
    Comparison,
    compare_runs,
    describe_group,
)

logger = logging.getLogger(__name__)


def latest_sweep_parent(uri: str, experiment: str) -> str:
    """The id of the most recent sweep's parent run in the experiment."""
    from tfstack import tracking

    parents = [
        run
        for run in tracking.search_runs(uri, experiment, statuses=None)
        if "sweep_dir" in run["tags"]
    ]
    if not parents:
        raise CompareError(
            f"No sweep in experiment {experiment!r} ({uri}): run `tfstack run -m ...` first, or "
            "compare without --parent."
        )
    return max(parents, key=lambda run: run["start_time"] or 0)["run_id"]


def compare_store(
    uri: str,
    experiment: str,
    *,
    parent_run_id: str | None = None,
    filter_string: str | None = None,
    group_by: Sequence[str] = GROUP_BY,
    val_metric: str = VAL_METRIC,
    rank_by: str = RANK_BY,
    out_dir: Path,
    log_to_parent: bool = True,
) -> tuple[Comparison, dict[str, Path], str | None]:
    """Compare the finished runs of an experiment (or of one sweep), write and log the result.

    Args:
        uri: Tracking URI.
        experiment: Experiment name.
        parent_run_id: Only this sweep's runs; ``"last"`` for the most recent sweep.
        filter_string: An MLflow filter such as ``"tags.freeze = 'joint'"``.
        group_by, val_metric, rank_by: see ``compare_runs``.
        out_dir: Where to write the CSV, Markdown and PNG.
        log_to_parent: Log the files to the parent run (``comparison/``) when all compared runs
            share one.

    Returns:
        The comparison, the written files, and the parent run they were logged to (or None).

    Raises:
        CompareError: No finished pipeline runs match.
    """
    from tfstack import tracking

    if parent_run_id == "last":
        parent_run_id = latest_sweep_parent(uri, experiment)
    if parent_run_id:
        tracking.get_run(uri, parent_run_id)  # a clear error for a wrong id
    runs = tracking.search_runs(
        uri, experiment, parent_run_id=parent_run_id, filter_string=filter_string
    )
    # Pipeline runs only: a sweep's parent has no configuration tags and no test metrics. A
    # reproduction repeats its source run (same seed), so it would count as a second seed.
    runs = [
        run
        for run in runs
        if all(key in run["tags"] for key in ("freeze", "stacking"))
        and "reproduced_from" not in run["tags"]
    ]
    if not runs:
        where = f"children of run {parent_run_id}" if parent_run_id else f"experiment {experiment}"
        where += f" matching {filter_string!r}" if filter_string else ""
        raise CompareError(
            f"No finished tfstack runs among the {where} ({uri}). Run `tfstack run` or a sweep "
            "first, or check tracking.uri / tracking.experiment / --filter."
        )
    metrics = [val_metric] + (["val_loss"] if val_metric != "val_loss" else [])
    histories = {
        run["run_id"]: {key: tracking.metric_history(uri, run["run_id"], key) for key in metrics}
        for run in runs
    }
    comparison = compare_runs(
        runs, histories, group_by=group_by, val_metric=val_metric, rank_by=rank_by
    )
    files = comparison.write(out_dir)
    parents = {run["tags"].get(tracking.PARENT_RUN_TAG) for run in runs}
    parent = parent_run_id or (parents.pop() if len(parents) == 1 else None)
    if parent and log_to_parent:
        tracking.attach_run(uri, parent)
        for path in files.values():
            tracking.log_artifact_file(parent, path, "comparison")
        best = comparison.rows[0]
        tracking.log_tags(
            parent,
            {
                "comparison_verdict": comparison.verdict,
                "best_config": describe_group(best.group, group_by),
            },
        )
        logger.info("Logged the comparison to parent run %s", parent)
    return comparison, files, parent
