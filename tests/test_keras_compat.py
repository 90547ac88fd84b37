"""The private Keras/TensorFlow APIs of tfstack/_keras_compat.py, each exercised by name.

A Keras or TensorFlow release that renames or changes one of them fails here, saying which,
before it can fail somewhere deep in training.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfstack import _keras_compat
from tfstack.distribute import is_multi_worker


def _nested_model():
    inner_input = keras.Input((4,), name="inner_input")
    inner = keras.Model(
        inner_input, keras.layers.Dropout(0.5, name="drop")(inner_input), name="inner"
    )
    inputs = keras.Input((4,), name="outer_input")
    outputs = keras.layers.Dense(2, name="dense")(inner(inputs))
    return keras.Model(inputs, outputs, name="outer")


def test_the_installed_versions_are_the_tested_ones():
    assert _keras_compat.check_versions() == []


def test_flatten_layers_reaches_layers_of_nested_models():
    names = [layer.name for layer in _keras_compat.flatten_layers(_nested_model())]
    assert names[0] == "outer"
    assert {"inner", "drop", "dense"} <= set(names)


def test_seed_generators_tell_random_layers_from_deterministic_ones():
    assert _keras_compat.uses_seed_generators(keras.layers.Dropout(0.5))
    assert _keras_compat.uses_seed_generators(keras.layers.RandomFlip())
    assert not _keras_compat.uses_seed_generators(keras.layers.Dense(2))


def test_producer_names_the_layer_and_its_call():
    model = _nested_model()
    operation, node = _keras_compat.producer(model.outputs[0])
    assert operation.name == "dense"
    (parent,) = node.input_tensors
    assert _keras_compat.producer(parent)[0].name == "inner"


def test_multi_worker_mode_is_false_outside_a_cluster():
    assert not _keras_compat.in_multi_worker_mode(tf.distribute.get_strategy())


def test_op_determinism_can_be_switched_off_again():
    from tensorflow.python.framework import config as tf_config

    tf.config.experimental.enable_op_determinism()
    assert tf_config.is_op_determinism_enabled()
    _keras_compat.disable_op_determinism()
    assert not tf_config.is_op_determinism_enabled()


def test_multi_worker_fit_fix_finds_kerass_functions_and_leaves_one_process_alone():
    from keras.src.backend.tensorflow import trainer

    assert hasattr(trainer, "reduce_per_replica")
    assert hasattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build")
    _keras_compat.fix_multi_worker_fit(is_multi_worker)
    assert getattr(trainer.reduce_per_replica, "_tfstack_fix", False)
    # Outside multi-worker mode fit is Keras's own: it still trains.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(np.ones((8, 3)), np.zeros((8, 1)), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2


def test_keras_home_is_the_folder_keras_caches_under():
    import os

    assert _keras_compat.keras_home() == keras.src.backend.config.keras_home()
    assert os.path.isabs(os.path.expanduser(_keras_compat.keras_home()))


def test_file_matches_hash_is_kerass_md5_and_sha256_check(tmp_path):
    import hashlib

    file = tmp_path / "weights.h5"
    file.write_bytes(b"weights")
    for algorithm in ("md5", "sha256"):
        digest = hashlib.new(algorithm, b"weights").hexdigest()
        assert _keras_compat.file_matches_hash(str(file), digest)
        assert not _keras_compat.file_matches_hash(str(file), digest[::-1])


@pytest.mark.slow
def test_answering_get_file_reaches_the_applications_builders():
    from keras.src.utils import file_utils

    asked = []

    def answer(keras_get_file, fname=None, origin=None, **options):
        asked.append((fname, options["cache_subdir"], keras_get_file is original))
        raise LookupError("answered")

    original = file_utils.get_file
    with _keras_compat.answering_get_file(answer):
        try:
            keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), include_top=False)
        except LookupError:
            pass
    assert file_utils.get_file is original
    assert asked == [
        ("mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5", "models", True)
    ]
