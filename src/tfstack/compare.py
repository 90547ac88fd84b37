"""Compare tracked runs: one row per freeze policy x stacking strategy x schedule.

The table logic takes runs as plain dicts (as ``tracking.search_runs`` returns them: ``params``,
``tags``, ``metrics``) and their per-epoch validation histories, and returns rows, a verdict line
and a figure; `tfstack.pipeline.compare.compare_store` is the command's layer that reads them
from MLflow, writes ``comparison.csv``, ``comparison.md`` and ``validation_curves.png`` and logs
them to the sweep's parent run when there is one.

Where several runs share a configuration (several seeds), a cell shows the mean and the sample
standard deviation (``0.876 ± 0.012``); the verdict says when the winner's margin is inside that
spread.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from tfstack.errors import TfstackError
from tfstack.files import atomic_path

logger = logging.getLogger(__name__)

GROUP_BY = ("freeze", "stacking", "schedule")
VAL_METRIC = "val_accuracy"
RANK_BY = "test_accuracy"
# Params that differ between the seeds of one configuration without making it another one.
PER_RUN_PARAMS = ("seed", "output_dir", "tracking.")
# Metric names where smaller is better (the rest: larger is better).
LOWER_IS_BETTER = ("loss", "mae", "mse", "error", "seconds")

FREEZE_COLORS = {"frozen": "tab:blue", "joint": "tab:orange", "partial": "tab:green"}
STACKING_STYLES = {"sequential": "-", "adapter": "--", "functional": ":"}
SCHEDULE_MARKERS = {"single": "o", "two_phase": "s", "gradual": "^"}


class CompareError(TfstackError):
    """Nothing to compare, or the runs lack what the comparison needs."""


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better (losses, errors, timings)."""
    return any(part in metric for part in LOWER_IS_BETTER)


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def best_epoch(
    history: Sequence[tuple[int, float]], metric: str
) -> tuple[float | None, int | None]:
    """The best value of a per-epoch history and its 1-based epoch (the first one on ties).

    Args:
        history: ``(step, value)`` pairs; MLflow steps are 0-based global epochs.
        metric: the history's name, which decides whether larger or smaller is better.
    """
    points = [(step, value) for step, value in history if _number(value) is not None]
    if not points:
        return None, None
    sign = 1.0 if lower_is_better(metric) else -1.0
    step, value = min(points, key=lambda point: (sign * point[1], point[0]))
    return float(value), int(step) + 1


@dataclass
class RunSummary:
    """What one run contributes to the table (plain values)."""

    run_id: str
    run_name: str | None
    group: tuple[str, ...]
    values: dict[str, float | None]
    curves: dict[str, list[tuple[int, float]]]
    params: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None


def group_value(run: Mapping, key: str) -> str:
    """A run's value for a grouping key: its tag, else its param (``train.lr``), else ``-``."""
    return str(run["tags"].get(key, run["params"].get(key, "-")))


def summarize_run(
    run: Mapping,
    histories: Mapping[str, Sequence[tuple[int, float]]],
    *,
    group_by: Sequence[str] = GROUP_BY,
    val_metric: str = VAL_METRIC,
) -> RunSummary:
    """One run's cells: test metrics, best validation value and epoch, epochs, time, size.

    Args:
        run: a run dict (``run_id``, ``run_name``, ``params``, ``tags``, ``metrics``).
        histories: metric name -> ``(step, value)`` history; needs ``val_metric`` and
            ``val_loss`` for the curves (missing ones leave blank cells).
        group_by: tag or param names that define a configuration.
        val_metric: the validation history whose best value and epoch are reported.
    """
    metrics = run["metrics"]
    val_history = list(histories.get(val_metric, []))
    best, epoch = best_epoch(val_history, val_metric)
    steps = {step for history in histories.values() for step, _ in history}
    values = {
        "test_accuracy": _number(metrics.get("test_accuracy")),
        "test_loss": _number(metrics.get("test_loss")),
        f"best_{val_metric}": best,
        "best_epoch": None if epoch is None else float(epoch),
        "epochs": float(len(steps)) if steps else None,
        "train_seconds": _number(metrics.get("stage_seconds_train")),
        "params_trainable": _number(metrics.get("params_trainable")),
    }
    for name, value in metrics.items():  # other test metrics (AUC, MAE...) for --rank-by
        if name.startswith("test_") and name not in values:
            values[name] = _number(value)
    return RunSummary(
        run_id=run["run_id"],
        run_name=run.get("run_name"),
        group=tuple(group_value(run, key) for key in group_by),
        values=values,
        curves={name: list(history) for name, history in histories.items()},
        params=dict(run["params"]),
        parent_run_id=run["tags"].get("mlflow.parentRunId"),
    )


@dataclass
class Row:
    """One configuration: its runs and, per column, the mean and spread over them."""

    group: tuple[str, ...]
    runs: list[RunSummary]
    mean: dict[str, float | None]
    spread: dict[str, float | None]
    varying_params: list[str]

    @property
    def n(self) -> int:
        return len(self.runs)


def _varying_params(runs: Sequence[RunSummary]) -> list[str]:
    keys = sorted({key for run in runs for key in run.params})
    return [
        key
        for key in keys
        if not key.startswith(PER_RUN_PARAMS) and len({run.params.get(key) for run in runs}) > 1
    ]


def group_runs(summaries: Sequence[RunSummary]) -> list[Row]:
    """Rows of runs sharing a configuration, in first-seen order, with mean and spread."""
    groups: dict[tuple[str, ...], list[RunSummary]] = {}
    for summary in summaries:
        groups.setdefault(summary.group, []).append(summary)
    rows = []
    for group, runs in groups.items():
        columns = list(dict.fromkeys(name for run in runs for name in run.values))
        mean, spread = {}, {}
        for column in columns:
            numbers = [run.values.get(column) for run in runs]
            numbers = [x for x in numbers if x is not None]
            mean[column] = statistics.fmean(numbers) if numbers else None
            spread[column] = statistics.stdev(numbers) if len(numbers) > 1 else None
        rows.append(Row(group, runs, mean, spread, _varying_params(runs)))
    return rows


def rank_rows(rows: Sequence[Row], rank_by: str = RANK_BY) -> list[Row]:
    """Rows best first by the mean of ``rank_by``; rows without it go last."""
    sign = 1.0 if lower_is_better(rank_by) else -1.0

    def key(row: Row):
        value = row.mean.get(rank_by)
        return (value is None, sign * value if value is not None else 0.0)

    return sorted(rows, key=key)


def describe_group(group: Sequence[str], group_by: Sequence[str] = GROUP_BY) -> str:
    """``freeze=joint stacking=adapter schedule=single``."""
    return " ".join(f"{key}={value}" for key, value in zip(group_by, group, strict=True))


def verdict(rows: Sequence[Row], rank_by: str = RANK_BY, group_by: Sequence[str] = GROUP_BY):
    """One line naming the best configuration and its margin over the next.

    ``rows`` must be ranked (``rank_rows``).
    """
    ranked = [row for row in rows if row.mean.get(rank_by) is not None]
    if not ranked:
        return f"No run has {rank_by}; nothing to rank (choose another metric with --rank-by)."
    best = ranked[0]
    head = f"Best: {describe_group(best.group, group_by)} with {rank_by} {best.mean[rank_by]:.4f}"
    if best.n > 1:
        head += f" (mean of {best.n} runs)"
    if len(ranked) == 1:
        return head + "; it is the only configuration with that metric."
    second = ranked[1]
    margin = abs(best.mean[rank_by] - second.mean[rank_by])
    if margin == 0:
        return (
            f"Tie: {describe_group(best.group, group_by)} and "
            f"{describe_group(second.group, group_by)} both reach {rank_by} "
            f"{best.mean[rank_by]:.4f}."
        )
    line = (
        f"{head}, {margin:.4f} {'below' if lower_is_better(rank_by) else 'above'} the next, "
        f"{describe_group(second.group, group_by)} ({second.mean[rank_by]:.4f})."
    )
    spreads = [s for s in (best.spread.get(rank_by), second.spread.get(rank_by)) if s is not None]
    if spreads and margin <= max(spreads):
        line += f" The margin is within the spread over seeds (±{max(spreads):.4f}): no clear win."
    return line


def table_columns(val_metric: str = VAL_METRIC) -> list[tuple[str, str, int]]:
    """``(column, header, decimals)`` of the table, in order."""
    return [
        ("test_accuracy", "test acc", 4),
        ("test_loss", "test loss", 4),
        (f"best_{val_metric}", f"best {val_metric}", 4),
        ("best_epoch", "at epoch", 0),
        ("epochs", "epochs", 0),
        ("train_seconds", "train s", 1),
        ("params_trainable", "trainable", 0),
    ]


def _cell(row: Row, column: str, decimals: int) -> str:
    value = row.mean.get(column)
    if value is None:
        return "-"
    text = f"{value:.{decimals}f}"
    spread = row.spread.get(column)
    return f"{text} ± {spread:.{decimals}f}" if spread else text


def table_cells(rows: Sequence[Row], group_by=GROUP_BY, val_metric=VAL_METRIC):
    """Header and string cells of the table (``mean ± spread`` where several runs)."""
    columns = table_columns(val_metric)
    header = [*group_by, "runs", *(title for _, title, _ in columns)]
    body = [
        [*row.group, str(row.n), *(_cell(row, name, decimals) for name, _, decimals in columns)]
        for row in rows
    ]
    return header, body


def to_text(rows: Sequence[Row], group_by=GROUP_BY, val_metric=VAL_METRIC) -> str:
    """The table aligned for a terminal."""
    header, body = table_cells(rows, group_by, val_metric)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def aligned(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    lines = [aligned(header), aligned(["-" * width for width in widths])]
    lines += [aligned(cells) for cells in body]
    return "\n".join(line.rstrip() for line in lines)


def to_markdown(rows: Sequence[Row], group_by=GROUP_BY, val_metric=VAL_METRIC, note: str = ""):
    """The table as GitHub Markdown, with the verdict (``note``) under it."""
    header, body = table_cells(rows, group_by, val_metric)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Row], group_by=GROUP_BY, val_metric=VAL_METRIC) -> str:
    """The table as CSV: per column its mean and standard deviation (empty for one run)."""
    columns = [name for name, _, _ in table_columns(val_metric)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [*group_by, "runs", *(f"{name}_{part}" for name in columns for part in ("mean", "std"))]
    )
    for row in rows:
        cells = []
        for name in columns:
            for value in (row.mean.get(name), row.spread.get(name)):
                cells.append("" if value is None else repr(float(value)))
        writer.writerow([*row.group, row.n, *cells])
    return out.getvalue()


def _mean_curve(runs: Sequence[RunSummary], metric: str):
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, value in run.curves.get(metric, []):
            if _number(value) is not None:
                by_step.setdefault(int(step), []).append(float(value))
    steps = sorted(by_step)
    means = [statistics.fmean(by_step[s]) for s in steps]
    spreads = [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
    return steps, means, spreads


def curves_figure(rows: Sequence[Row], group_by=GROUP_BY, val_metric=VAL_METRIC):
    """Validation curves of every configuration overlaid: colour = freeze policy, line style =
    stacking, marker = schedule; mean over seeds with a band of ± one standard deviation."""
    panels = [val_metric, "val_loss"] if val_metric != "val_loss" else ["val_loss"]
    fig = Figure(figsize=(6.0 * len(panels), 4.2), dpi=100)
    axes = fig.subplots(1, len(panels))
    axes = list(axes) if len(panels) > 1 else [axes]
    keys = dict(zip(group_by, range(len(group_by)), strict=True))
    for i, row in enumerate(rows):
        freeze = row.group[keys["freeze"]] if "freeze" in keys else None
        stacking = row.group[keys["stacking"]] if "stacking" in keys else None
        schedule = row.group[keys["schedule"]] if "schedule" in keys else None
        style = {
            "color": FREEZE_COLORS.get(freeze, f"C{(i + 3) % 10}"),
            "linestyle": STACKING_STYLES.get(stacking, "-."),
            "marker": SCHEDULE_MARKERS.get(schedule, "D"),
            "markersize": 4,
        }
        label = describe_group(row.group, group_by) + (f" (n={row.n})" if row.n > 1 else "")
        for ax, metric in zip(axes, panels, strict=True):
            steps, means, spreads = _mean_curve(row.runs, metric)
            if not steps:
                continue
            epochs = [s + 1 for s in steps]
            ax.plot(epochs, means, label=label, **style)
            if any(spreads):
                low = [m - s for m, s in zip(means, spreads, strict=True)]
                high = [m + s for m, s in zip(means, spreads, strict=True)]
                ax.fill_between(epochs, low, high, color=style["color"], alpha=0.15)
    for ax, metric in zip(axes, panels, strict=True):
        ax.set_xlabel("epoch (over all phases)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    if axes[0].get_lines():
        axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Validation curves: colour = freeze, line = stacking, marker = schedule")
    fig.tight_layout()
    return fig


@dataclass
class Comparison:
    """The result of a comparison: ranked rows, the verdict and the validation-curve figure."""

    rows: list[Row]
    verdict: str
    figure: object
    group_by: tuple[str, ...] = GROUP_BY
    val_metric: str = VAL_METRIC
    rank_by: str = RANK_BY
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(
            [to_text(self.rows, self.group_by, self.val_metric), "", *self.notes, self.verdict]
        )

    def write(self, out_dir: Path) -> dict[str, Path]:
        """Write ``comparison.csv``, ``comparison.md`` and ``validation_curves.png``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {
            "csv": out_dir / "comparison.csv",
            "markdown": out_dir / "comparison.md",
            "png": out_dir / "validation_curves.png",
        }
        note = "\n\n".join([*self.notes, self.verdict])
        with atomic_path(files["csv"]) as tmp:
            tmp.write_text(to_csv(self.rows, self.group_by, self.val_metric))
        with atomic_path(files["markdown"]) as tmp:
            tmp.write_text(to_markdown(self.rows, self.group_by, self.val_metric, note=note))
        with atomic_path(files["png"]) as tmp:
            self.figure.savefig(tmp, format="png")
        return files


def compare_runs(
    runs: Sequence[Mapping],
    histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    *,
    group_by: Sequence[str] = GROUP_BY,
    val_metric: str = VAL_METRIC,
    rank_by: str = RANK_BY,
) -> Comparison:
    """Group, rank and describe runs.

    Args:
        runs: run dicts (``run_id``, ``run_name``, ``params``, ``tags``, ``metrics``).
        histories: run id -> metric name -> ``(step, value)`` history.
        group_by: tag or param names defining a configuration.
        val_metric: validation history reported as best value and epoch, and plotted.
        rank_by: column the verdict ranks by (``test_accuracy``, ``best_val_accuracy``, ...).

    Raises:
        CompareError: no runs.
    """
    if not runs:
        raise CompareError("No runs to compare.")
    summaries = [
        summarize_run(
            run, histories.get(run["run_id"], {}), group_by=group_by, val_metric=val_metric
        )
        for run in runs
    ]
    rows = rank_rows(group_runs(summaries), rank_by)
    notes = [
        f"Note: the {row.n} runs of {describe_group(row.group, group_by)} also differ in "
        f"{', '.join(row.varying_params)}; add them to --group-by to separate them."
        for row in rows
        if row.varying_params
    ]
    return Comparison(
        rows=rows,
        verdict=verdict(rows, rank_by, group_by),
        figure=curves_figure(rows, group_by, val_metric),
        group_by=tuple(group_by),
        val_metric=val_metric,
        rank_by=rank_by,
        notes=notes,
    )
