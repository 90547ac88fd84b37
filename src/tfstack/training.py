"""THE phase loop: apply each phase's freeze policy, recompile, fit, continue the epoch count.

Every phase recompiles with a fresh optimizer (a ``trainable`` change made after ``compile`` does
nothing in Keras 3, and an optimizer built for one set of variables refuses another), then calls
``fit`` with ``initial_epoch`` so that epochs, and anything logged per epoch, form one global
sequence across phases.

`run_schedule` is the loop the pipeline runs and the tests test. Its options:

- Epoch-seeded order: an `ArrayDataset` with ``epoch_seeded=True`` is told each epoch's index
  (`EpochOrder`), so each epoch's order depends on ``(seed, epoch)`` only, not on how many
  epochs (or iterators) this process ran before.
- Checkpoints (``checkpoint_dir``): after every epoch, `EpochCheckpoint` records the epoch into
  a `tfstack.checkpoints.TrainingState` and writes it (the format is `tfstack.checkpoints`').
- Resuming (``resume_from``): the variables are restored, the finished phases are skipped, the
  optimizer is restored when the checkpoint falls inside a phase, and that phase is fitted from
  the next epoch. With epoch-seeded data the continuation is the uninterrupted run, to the bit.
- Frozen-feature caching and inference mode for frozen feature extractors
  (``cache_frozen``, see `tfstack.frozen_features`).
- Early stopping per phase (``early_stopping``, see `tfstack.early_stopping`). A phase that
  stops early, by it or by any callback, hands over to the next phase at the next global epoch;
  its result has the epochs it ran (``epochs``) and those planned (``planned_epochs``).
- Learning-rate schedules per phase (``lr_schedule``, see `tfstack.lr_schedules`): relative to
  the phase (its optimizer's step count starts with it, and is restored on resume).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from tfstack import cached_features, checkpoints, frozen_features, guards, lr_schedules
from tfstack.checkpoints import TrainingState
from tfstack.datasets import IndexedDataset
from tfstack.early_stopping import (
    ARRAYS,
    STATE_KEY,
    EarlyStoppingSpec,
    PhaseEarlyStopping,
    stopped_at_checkpoint,
)
from tfstack.epoch_callbacks import EpochCheckpoint, EpochOrder, StopOnNonFiniteLoss, batches_of
from tfstack.errors import TrainingError
from tfstack.freezing import FreezeReport, apply_freeze_policy
from tfstack.lr_schedules import LrScheduleSpec
from tfstack.phase_results import PhaseResult, epochs_in
from tfstack.schedules import Phase, make_optimizer
from tfstack.user_callbacks import FullModelCallbacks

if TYPE_CHECKING:
    from tfstack.feature_cache import FeatureCache

logger = logging.getLogger(__name__)


def compile_phase(
    model: keras.Model,
    phase: Phase,
    *,
    loss,
    metrics: Sequence,
    feature_extractors: list[str],
    learning_rate=None,
    jit_compile: bool | str = "auto",
) -> FreezeReport:
    """Apply a phase's freeze policy, then compile with a fresh optimizer.

    Args:
        model: the stacked model.
        phase: the phase to prepare.
        loss: a Keras loss (name or object).
        metrics: Keras metrics (names or objects).
        feature_extractors: names of the feature-extractor components.
        learning_rate: the optimizer's ``learning_rate`` instead of ``phase.lr``: a Keras
            schedule over the phase's steps (`tfstack.lr_schedules`).
        jit_compile: Keras's ``compile(jit_compile=...)``: ``"auto"`` (XLA where Keras judges
            it supported: not on a CPU-only machine, under a distribution strategy or op
            determinism), True or False.

    Returns:
        The freeze report with the checked parameter counts.

    Raises:
        TrainingError: ``jit_compile=True`` and Keras runs the model without XLA.
    """
    report = apply_freeze_policy(model, phase.freeze, feature_extractors=feature_extractors)
    rate = phase.lr if learning_rate is None else learning_rate
    optimizer = make_optimizer(
        phase.optimizer, rate, model=model, lr_multipliers=phase.lr_multipliers
    )
    with warnings.catch_warnings():  # Keras's fallback warning becomes the error below
        warnings.filterwarnings("ignore", message=".*doesn't support `jit_compile=True`")
        model.compile(
            optimizer=optimizer, loss=loss, metrics=list(metrics), jit_compile=jit_compile
        )
    if jit_compile is True and not model.jit_compile:
        raise TrainingError(guards.no_xla_reason(model))
    return report


def fit_phase(
    model: keras.Model,
    phase: Phase,
    train_data,
    val_data=None,
    *,
    loss,
    metrics: Sequence = (),
    feature_extractors: list[str],
    index: int = 0,
    initial_epoch: int = 0,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int | str = "auto",
    cache_frozen: bool = False,
    feature_cache: FeatureCache | None = None,
    feature_memory_mb: float | None = None,
    learning_rate=None,
    class_weight: dict[int, float] | None = None,
    jit_compile: bool | str = "auto",
) -> PhaseResult:
    """Freeze, recompile and fit one phase.

    Frozen feature extractors are called with ``training=False`` (their Dropout, noise and
    random augmentation off; ``inference_mode`` in the result names those it changed): the
    phase fits `tfstack.frozen_features.inference_view`, whose layers are the model's. An
    epoch-seeded `ArrayDataset` is told each epoch's index (`EpochOrder`), so epoch ``k`` has
    epoch ``k``'s order whatever ran before.

    With ``cache_frozen``, a phase whose feature extractors are all frozen computes the frozen
    part's outputs once per split and fits the trainable part on them (see
    `tfstack.frozen_features`); the result's ``cached`` and ``cache_note`` say whether and why.
    In a cached or inference-mode phase the callbacks are attached to that model, which shares
    the stacked model's variables and optimizer. Activity regularizers in a feature extractor, a
    training extractor, and random layers between it and the trainable layers prevent caching; a
    custom layer that changes its output with ``training`` in some other way is not detected,
    so turn caching off for it.

    Args:
        model: the stacked model.
        phase: the phase.
        train_data: an `ArrayDataset` or a batched ``tf.data.Dataset`` of ``(x, y)`` (caching
            needs an `ArrayDataset`, whose order it can replay).
        val_data: an optional validation `ArrayDataset` or batched dataset.
        loss: a Keras loss.
        metrics: Keras metrics.
        feature_extractors: names of the feature-extractor components.
        index: the phase's position in the schedule.
        initial_epoch: the global epoch this phase starts at.
        callbacks: Keras callbacks for this phase.
        verbose: Keras ``fit`` verbosity.
        cache_frozen: train on cached outputs of the frozen part when the phase allows it.
        feature_cache: a shared on-disk cache of those outputs (`tfstack.feature_cache`): read
            from it when another run stored them, else computed and stored (None: computed,
            kept for the phase only). The result's ``cache`` says ``hit``, ``miss`` or ``off``.
        feature_memory_mb: above this budget (MB, train and validation) those outputs stream
            through files, never all in memory (`tfstack.feature_streaming`); None: in memory.
        learning_rate: what the optimizer gets instead of ``phase.lr`` (see `compile_phase`).
        class_weight: ``{class index: weight}`` for Keras ``fit`` (`tfstack.class_weights`);
            Keras weighs each sample by its label, cached phases included.
        jit_compile: XLA or not (see `compile_phase`); a cached phase's trainable part and an
            inference-mode view are compiled as the model was.

    Returns:
        The phase result, with Keras's history for the phase.

    Raises:
        TrainingError: the loss became non-finite.
    """
    report = compile_phase(
        model,
        phase,
        loss=loss,
        metrics=metrics,
        feature_extractors=feature_extractors,
        learning_rate=learning_rate,
        jit_compile=jit_compile,
    )
    logger.info(
        "Phase %d %r: %d epochs from epoch %d, lr=%g, freeze=%s, trainable=%d",
        index,
        phase.name,
        phase.epochs,
        initial_epoch,
        phase.lr,
        phase.freeze.describe(),
        report.counts.trainable,
    )
    start = time.perf_counter()
    split, note = None, "cache_frozen is off"
    features = None
    if cache_frozen:
        split, note = frozen_features.plan_cache(model, feature_extractors, train_data, val_data)
    fit_model, fit_train, fit_val = model, batches_of(train_data), batches_of(val_data)
    # Also in a cached phase: its batches are drawn from the same index order.
    order = [EpochOrder(train_data)] if isinstance(train_data, IndexedDataset) else []
    fit_callbacks = [StopOnNonFiniteLoss(phase.name), *order, *callbacks]
    if split is not None:
        # A small head's steps: one call per epoch, unless a callback needs every batch.
        per_call, why = frozen_features.cached_steps_per_execution(
            fit_callbacks, getattr(train_data, "steps", None)
        )
        logger.info("Phase %d %r: steps_per_execution=%d: %s", index, phase.name, per_call, why)
        fit_model = frozen_features.compiled_like(
            model, split.trainable, loss=loss, metrics=metrics, steps_per_execution=per_call
        )
        frozen_features.remember_split(model, split)  # evaluation reuses its traced frozen part
        splits = {"train": train_data, "val": val_data}
        features = cached_features.phase_features(
            split, splits, feature_cache, memory_mb=feature_memory_mb
        )
        fit_train = train_data.with_inputs(features.outputs["train"])
        if val_data is not None:
            fit_val = val_data.with_inputs(features.outputs["val"])
        if features.streamed:  # in phases.json: over feature_memory_mb, read from files
            note += "; streamed from disk, over the feature memory budget"
        logger.info("Phase %d %r: %s; training %r on them", index, phase.name, note, fit_model.name)
    elif cache_frozen:
        logger.info("Phase %d %r: not caching frozen outputs: %s", index, phase.name, note)
    # Cached phases run the frozen part in inference mode already (predict).
    inference = frozen_features.frozen_in_training_mode(model, feature_extractors)
    for name in inference:
        # Never silently: augmentation baked into a frozen base is off in this phase.
        layers = frozen_features.training_mode_layers(model.get_layer(name))
        logger.warning(
            "Phase %d %r: the frozen feature extractor %r holds layers that act only in "
            "training mode (%s); while it is frozen they run in inference mode, i.e. they are "
            "off. To keep augmentation active, put it in front of the base "
            "(tfstack.augmentation).",
            index,
            phase.name,
            name,
            ", ".join(layers),
        )
    if inference and split is None:
        view = frozen_features.inference_view(model, inference)
        fit_model = frozen_features.compiled_like(model, view, loss=loss, metrics=metrics)
        logger.info(
            "Phase %d %r: calling frozen %s with training=False", index, phase.name, inference
        )
    try:
        history = fit_model.fit(
            fit_train,
            validation_data=fit_val,
            epochs=initial_epoch + phase.epochs,
            initial_epoch=initial_epoch,
            callbacks=fit_callbacks,
            verbose=verbose,
            # A tf.data pipeline shuffles itself (seeded); Keras's shuffle is for arrays only.
            shuffle=not isinstance(fit_train, tf.data.Dataset),
            class_weight=class_weight,
        )
    finally:
        if features is not None:
            features.close()  # streamed features: their files; a temporary directory goes
    seconds = time.perf_counter() - start
    return PhaseResult(
        **_phase_fields(phase, index, initial_epoch),
        counts=report.counts,
        history={k: [float(v) for v in values] for k, values in history.history.items()},
        seconds=seconds,
        cached=split is not None,
        cache_note=note,
        cache="off" if features is None else features.status,
        cache_keys={} if features is None else features.keys,
        inference_mode=inference,
    )


def run_schedule(
    model: keras.Model,
    phases: Sequence[Phase],
    train_data,
    val_data=None,
    *,
    loss,
    metrics: Sequence = (),
    feature_extractors: list[str],
    callbacks: Sequence[keras.callbacks.Callback] = (),
    callbacks_for_phase: Callable[[Phase, int], list] | None = None,
    verbose: int | str = "auto",
    cache_frozen: bool = False,
    feature_cache: FeatureCache | None = None,
    feature_memory_mb: float | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: TrainingState | None = None,
    checkpoint_key: str = "",
    run_id: str | None = None,
    early_stopping: EarlyStoppingSpec | Sequence[EarlyStoppingSpec | None] | None = None,
    lr_schedule: LrScheduleSpec | Sequence[LrScheduleSpec | None] | None = None,
    class_weight: dict[int, float] | None = None,
    jit_compile: bool | str = "auto",
) -> list[PhaseResult]:
    """Run every phase in order, continuing the global epoch count; checkpoint and resume.

    A phase that stops early (its early stopping, or any callback setting
    ``model.stop_training``) hands over to the next phase at the next global epoch; its result
    has the epochs it ran.

    Args:
        model: the stacked model.
        phases: the schedule.
        train_data: an `ArrayDataset` or a batched ``tf.data.Dataset`` of ``(x, y)``. One
            dataset serves every phase. An `ArrayDataset` with ``epoch_seeded=True`` gives each
            epoch the order of ``(seed, epoch)``, which a resumed run needs to continue exactly.
        val_data: an optional validation `ArrayDataset` or batched dataset.
        loss: a Keras loss.
        metrics: Keras metrics.
        feature_extractors: names of the feature-extractor components.
        callbacks: callbacks used in every phase; their ``self.model`` is ``model`` even in a
            cached or inference-mode phase (`tfstack.user_callbacks.FullModelCallbacks`), and
            one that sets ``stop_training`` ends the phase.
        callbacks_for_phase: called with ``(phase, index)``; returns extra callbacks for that
            phase (e.g. a tracking hook that records the phase name). They run after the
            checkpoint's, so an epoch they log is already checkpointed.
        verbose: Keras ``fit`` verbosity.
        cache_frozen: in phases that allow it, train on cached outputs of the frozen part
            (see `fit_phase`).
        feature_cache: the shared on-disk cache of those outputs (see `fit_phase`).
        feature_memory_mb: above this budget, those outputs stream from disk (see `fit_phase`).
        checkpoint_dir: write a checkpoint there after every epoch (None: no checkpoints).
        resume_from: a checkpoint read from ``checkpoint_dir`` (`tfstack.checkpoints.read_state`)
            to continue from; the caller has checked it belongs to this run (its key and run id).
        checkpoint_key: what the checkpoint belongs to (config and data), recorded in it.
        run_id: an opaque id recorded in the checkpoint (the pipeline's MLflow run).
        early_stopping: one rule for every phase, or one per phase (None: that phase runs all
            its epochs); see `tfstack.early_stopping`. Its state is part of every checkpoint, so
            a resumed phase stops (and restores its best weights) as the uninterrupted one.
        lr_schedule: one learning-rate schedule for every phase, or one per phase (None:
            constant); see `tfstack.lr_schedules`. A resumed phase continues its schedule.
        class_weight: ``{class index: weight}`` for every phase's ``fit`` (see `fit_phase`).
        jit_compile: every phase's XLA setting (see `compile_phase`).

    Returns:
        One PhaseResult per phase, including the phases and epochs a resumed run had done.

    Raises:
        TrainingError: training diverged, or ``resume_from`` does not fit the schedule or model.

    Example:
        >>> import keras, numpy as np
        >>> from tfstack import ArrayDataset, FreezePolicy, build_stacked, make_schedule
        >>> from tfstack import run_schedule
        >>> base = keras.Sequential(
        ...     [keras.Input((6,)), keras.layers.Dense(8), keras.layers.Dense(4)], name="base"
        ... )
        >>> head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, "softmax")])
        >>> model = build_stacked("sequential", base, head).model
        >>> x, y = np.random.rand(32, 6).astype("float32"), np.arange(32) % 2
        >>> phases = make_schedule(
        ...     "two_phase", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy("frozen")
        ... )
        >>> results = run_schedule(
        ...     model, phases, ArrayDataset(x, y, batch_size=8, shuffle=True, seed=0),
        ...     loss="sparse_categorical_crossentropy", feature_extractors=["base"], verbose=0,
        ... )
        >>> [(r.name, r.counts.trainable) for r in results]
        [('head', 10), ('fine_tune', 102)]
    """
    if resume_from is not None and checkpoint_dir is None:
        raise ValueError("resume_from needs the checkpoint_dir it was read from")
    rules = _per_phase(early_stopping, EarlyStoppingSpec, phases, "early_stopping")
    rate_schedules = _per_phase(lr_schedule, LrScheduleSpec, phases, "lr_schedule")
    steps = lr_schedules.steps_per_epoch(train_data)
    for phase, spec in zip(phases, rate_schedules, strict=True):  # fail before any training
        if spec is not None:
            spec.build(phase.lr, steps_per_epoch=steps, epochs=phase.epochs)
    # User callbacks: in every phase, the stacked model as self.model (also in cached phases).
    callbacks = [FullModelCallbacks(callbacks, model)] if callbacks else []
    total = sum(p.epochs for p in phases)  # planned: phases that stop early end sooner
    state = resume_from
    if state is None:
        state = TrainingState(key=checkpoint_key, run_id=run_id, total_epochs=total)
    else:
        checkpoints.check_schedule(state, checkpoint_dir, total)
        if state.weights_file:
            checkpoints.restore_model(model, state, checkpoint_dir)
            logger.info(
                "Resuming training at epoch %d (of %d planned) from %s",
                state.epochs_done,
                total,
                checkpoint_dir,
            )
    results = []
    for index, phase in enumerate(phases):
        earlier = state.phases[index] if index < len(state.phases) else None
        if earlier is not None and earlier.get("finished"):  # finished before the checkpoint
            results.append(PhaseResult.from_dict(earlier))
            continue
        # A phase starts at the next global epoch: after the epochs the phases before it ran.
        start = earlier["initial_epoch"] if earlier is not None else state.epochs_done
        done_here = state.epochs_done - start  # > 0: the checkpoint falls inside this phase
        record = _phase_record(state, phase, index, start, resumed=done_here > 0)
        rule = rules[index]
        stopper = None
        if rule is not None:
            stopper = _early_stopping(rule, model, record, start, checkpoint_dir, state)
        if done_here >= phase.epochs or (done_here > 0 and stopped_at_checkpoint(record)):
            # Its last epoch was checkpointed; the process died before the phase ended.
            result = _ended_before_the_checkpoint(record, stopper)
        else:
            result = _fit_scheduled_phase(
                model,
                phase,
                index,
                train_data,
                val_data,
                state=state,
                record=record,
                start=start,
                stopper=stopper,
                lr_schedule=rate_schedules[index],
                checkpoint_dir=checkpoint_dir,
                callbacks=list(callbacks)
                + (callbacks_for_phase(phase, index) if callbacks_for_phase else []),
                loss=loss,
                metrics=metrics,
                feature_extractors=feature_extractors,
                verbose=verbose,
                cache_frozen=cache_frozen,
                feature_cache=feature_cache,
                feature_memory_mb=feature_memory_mb,
                class_weight=class_weight,
                jit_compile=jit_compile,
            )
        result.planned_epochs = phase.epochs
        result.early_stopping = None if rule is None else rule.to_dict()
        result.lr_schedule = (rate_schedules[index] or LrScheduleSpec()).to_dict()
        if stopper is not None:
            for key, value in stopper.summary().items():
                setattr(result, key, value)
        results.append(result)
        state.phases[index] = {**result.to_dict(), "finished": True}
        state.epochs_done = start + result.epochs
        if checkpoint_dir is not None:
            if result.restored_epoch is not None:
                # The model now holds the best epoch's weights, not the last checkpoint's.
                checkpoints.write_checkpoint(checkpoint_dir, state, model)
            else:
                checkpoints.write_state(checkpoint_dir, state)
    return results


def _fit_scheduled_phase(
    model: keras.Model,
    phase: Phase,
    index: int,
    train_data,
    val_data,
    *,
    state: TrainingState,
    record: dict[str, Any],
    start: int,
    stopper: PhaseEarlyStopping | None,
    lr_schedule: LrScheduleSpec | None,
    checkpoint_dir: Path | None,
    callbacks: list,
    **fit_options,
) -> PhaseResult:
    """Fit a phase of `run_schedule` from the state's next epoch: the phase's whole result."""
    done_here = state.epochs_done - start
    seconds_before = float(record.get("seconds", 0.0))
    phase_callbacks: list = []
    if done_here > 0:
        phase_callbacks.append(
            checkpoints.RestoreOptimizer(model, state, checkpoint_dir, phase_index=index)
        )
    # Over the whole phase (all its planned epochs), also when it resumes: the restored step
    # count continues the schedule. Its callbacks run before the checkpoint's.
    learning_rate, rate_callbacks = lr_schedules.for_phase(
        lr_schedule,
        phase.lr,
        steps_per_epoch=lr_schedules.steps_per_epoch(train_data),
        epochs=phase.epochs,
        record=record if checkpoint_dir is not None else None,
        resumed=done_here > 0,
    )
    phase_callbacks.extend(rate_callbacks)
    if stopper is not None:  # before the checkpoint, which records its decision
        phase_callbacks.append(stopper)
    if checkpoint_dir is not None:
        phase_callbacks.append(
            EpochCheckpoint(
                checkpoint_dir,
                model,
                state,
                phase_index=index,
                phase_record=record,
                early_stopping=stopper,
            )
        )
    result = fit_phase(
        model,
        dataclasses.replace(phase, epochs=phase.epochs - done_here),
        train_data,
        val_data,
        index=index,
        initial_epoch=state.epochs_done,
        callbacks=phase_callbacks + callbacks,
        learning_rate=learning_rate,
        **fit_options,
    )
    if done_here > 0:  # the whole phase: the epochs before the checkpoint, then these
        earlier = record.get("history", {})
        result.history = {
            k: list(earlier.get(k, []))[:done_here] + v for k, v in result.history.items()
        }
        result.seconds += seconds_before
    result.epochs = epochs_in(result.history)
    result.initial_epoch = start
    return result


def _ended_before_the_checkpoint(
    record: dict[str, Any], stopper: PhaseEarlyStopping | None
) -> PhaseResult:
    """The result of a phase whose last epoch is in the checkpoint, ended as fit would end it."""
    if stopper is not None:
        stopper.on_train_begin()  # loads its state from the checkpoint
        stopper.restore()
    logger.info("Phase %d %r had ended at the checkpoint", record["index"], record["name"])
    result = PhaseResult.from_dict({**record, "planned_epochs": record["epochs"]})
    result.epochs = epochs_in(result.history)
    return result


def _per_phase(setting, kind: type, phases: Sequence[Phase], what: str) -> list:
    """One setting (of type ``kind``) for every phase, or the list of one per phase."""
    if setting is None or isinstance(setting, kind):
        return [setting] * len(phases)
    rules = list(setting)
    if len(rules) != len(phases):
        raise ValueError(f"{what} has {len(rules)} entries for a schedule of {len(phases)} phases")
    return rules


def _early_stopping(
    rule: EarlyStoppingSpec,
    model: keras.Model,
    record: dict[str, Any],
    start: int,
    checkpoint_dir: Path | None,
    state: TrainingState,
) -> PhaseEarlyStopping:
    """The phase's early stopping, with the checkpoint's state when the phase is resumed."""
    saved = record.get(STATE_KEY) if state.epochs_done > start else None
    weights = None
    if saved and saved.get("best_weights"):
        weights = checkpoints.read_arrays(state, checkpoint_dir, ARRAYS, int(saved["best_weights"]))
    return PhaseEarlyStopping(rule, model, phase_start=start, resume=saved, best_weights=weights)


def _phase_record(
    state: TrainingState, phase: Phase, index: int, start: int, *, resumed: bool
) -> dict[str, Any]:
    """The phase's record in ``state.phases``: the checkpoint's when resumed, else a new one."""
    if resumed:
        record = state.phases[index]
    else:
        record = {"history": {}, "seconds": 0.0}
        del state.phases[index:]
        state.phases.append(record)
    record.update(_phase_fields(phase, index, start))
    return record


def _phase_fields(phase: Phase, index: int, initial_epoch: int) -> dict[str, Any]:
    """What a `PhaseResult` and a checkpoint's phase record say of the phase itself."""
    return {
        "name": phase.name,
        "index": index,
        "initial_epoch": initial_epoch,
        "epochs": phase.epochs,
        "lr": phase.lr,
        "freeze": phase.freeze.describe(),
    }
