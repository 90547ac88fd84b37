"""Tests of tfstack.data: loading .npz datasets, validation splits, tf.data pipelines, labels."""

import hashlib
import json

import numpy as np
import pytest
import tensorflow as tf
from dvc_data.hashfile.hash import file_md5

from tfstack.data import file_hash, load_npz, save_npz
from tfstack.datasets import ArrayDataset, make_dataset
from tfstack.errors import DataError
from tfstack.labels import check_labels


def write_dataset(path, n_train=60, n_test=20, classes=3, seed=0, **overrides):
    """An .npz with x_train, y_train, x_test, y_test (balanced integer labels), plus overrides."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.normal(size=(n_train, 4, 4, 1)).astype("float32"),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.normal(size=(n_test, 4, 4, 1)).astype("float32"),
        "y_test": np.arange(n_test) % classes,
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_load_npz_splits_sizes_and_stratifies(tmp_path):
    path = write_dataset(tmp_path / "d.npz", n_train=60, n_test=20, classes=3)

    splits = load_npz(path, val_fraction=0.2, seed=0)

    assert splits.x_train.shape == (48, 4, 4, 1)
    assert splits.x_val.shape == (12, 4, 4, 1)
    assert splits.x_test.shape == (20, 4, 4, 1)
    assert np.bincount(splits.y_val).tolist() == [4, 4, 4]
    assert np.bincount(splits.y_train).tolist() == [16, 16, 16]
    summary = splits.summary()
    assert summary["sizes"] == {"train": 48, "val": 12, "test": 20}
    assert summary["input_shape"] == [4, 4, 1]
    assert summary["classes"] == [0, 1, 2]
    assert summary["class_counts"]["val"] == {"0": 4, "1": 4, "2": 4}
    json.dumps(summary)  # JSON-ready, for logging as an artifact


def test_load_npz_reads_optional_class_names(tmp_path):
    plain = load_npz(write_dataset(tmp_path / "plain.npz"))
    assert plain.class_names is None and "class_names" not in plain.summary()
    names = np.array(["cat", "dog", "emu"])
    named = load_npz(write_dataset(tmp_path / "named.npz", class_names=names))
    assert named.class_names == ["cat", "dog", "emu"]
    assert named.summary()["class_names"] == ["cat", "dog", "emu"]
    with pytest.raises(DataError, match="class_names must be a 1-D array of strings"):
        load_npz(write_dataset(tmp_path / "bad.npz", class_names=np.arange(3)))
    # Names saved as Python objects need pickle: the message says how to store them instead
    # (it used to say "Save numeric arrays", wrong for names).
    pickled = write_dataset(tmp_path / "pickled.npz", class_names=np.array(["a", None, "c"]))
    with pytest.raises(DataError) as caught:
        load_npz(pickled)
    assert str(caught.value).startswith(f"data.path={pickled}: class_names cannot be read (")
    assert str(caught.value).endswith("class_names=np.array(['cat', 'dog'])).")


def test_load_npz_validation_split_is_a_seeded_partition_of_train(tmp_path):
    path = write_dataset(tmp_path / "d.npz", n_train=60)
    original = np.load(path)["x_train"]

    first = load_npz(path, seed=1)
    again = load_npz(path, seed=1)
    other = load_npz(path, seed=2)

    assert np.array_equal(first.x_val, again.x_val)
    assert not np.array_equal(first.x_val, other.x_val)
    rows = {row.tobytes() for row in original}
    split_rows = [row.tobytes() for row in np.concatenate([first.x_train, first.x_val])]
    assert len(split_rows) == 60 and set(split_rows) == rows


def test_load_npz_falls_back_to_random_split_when_a_class_is_too_small(tmp_path):
    # Class 2 has a single sample: it cannot appear on both sides, so the split is random.
    y_train = np.array([0] * 10 + [1] * 9 + [2])
    path = write_dataset(tmp_path / "d.npz", n_train=20, y_train=y_train)

    splits = load_npz(path, val_fraction=0.25, seed=0)

    assert len(splits.y_val) == 5 and len(splits.y_train) == 15


def test_load_npz_regression_targets_split_without_classes(tmp_path):
    y = np.linspace(0.0, 1.0, 30, dtype="float32")
    path = write_dataset(tmp_path / "d.npz", n_train=30, y_train=y, y_test=y[:20])

    splits = load_npz(path, val_fraction=0.1, seed=0)

    assert len(splits.y_val) == 3
    assert "classes" not in splits.summary()


def test_load_npz_missing_file_names_the_config_key(tmp_path):
    with pytest.raises(DataError, match=r"data\.path=.*nope\.npz: no such file"):
        load_npz(tmp_path / "nope.npz")


def test_load_npz_refuses_a_file_that_is_not_npz(tmp_path):
    text = tmp_path / "d.npz"
    text.write_text("x_train,y_train\n1,2\n")
    with pytest.raises(DataError, match=r"data\.path=.*d\.npz: not an \.npz file"):
        load_npz(text)
    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DataError, match=r"single array \(\.npy\)"):
        load_npz(npy)


def test_load_npz_missing_keys_lists_what_is_there(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((4, 2)), y_train=np.zeros(4), images=np.zeros(3))

    with pytest.raises(DataError) as err:
        load_npz(path)

    message = str(err.value)
    assert "missing x_test, y_test" in message
    assert "The file holds: images, x_train, y_train" in message
    assert f"data.path={path}" in message


def test_load_npz_length_mismatch(tmp_path):
    path = write_dataset(tmp_path / "d.npz", n_test=20, y_test=np.zeros(19, dtype=int))
    with pytest.raises(DataError, match="x_test has 20 samples but y_test has 19"):
        load_npz(path)


def test_load_npz_empty_test_split(tmp_path):
    empty = np.zeros((0, 4, 4, 1), dtype="float32")
    path = write_dataset(tmp_path / "d.npz", x_test=empty, y_test=np.zeros(0, dtype=int))
    with pytest.raises(DataError, match="the test split is empty"):
        load_npz(path)


def test_load_npz_validation_split_that_would_be_empty(tmp_path):
    path = write_dataset(tmp_path / "d.npz", n_train=2, classes=2)
    with pytest.raises(DataError) as err:
        load_npz(path, val_fraction=0.2)
    assert "validation split would be empty" in str(err.value)
    assert "data.val_fraction=0.2 of 2 training samples" in str(err.value)


def test_load_npz_val_fraction_out_of_range(tmp_path):
    path = write_dataset(tmp_path / "d.npz")
    with pytest.raises(DataError, match=r"Received: data\.val_fraction=1\.5"):
        load_npz(path, val_fraction=1.5)


def test_load_npz_non_finite_values(tmp_path):
    x_test = np.zeros((20, 4, 4, 1), dtype="float32")
    x_test[3, 0, 0, 0] = np.nan
    x_test[7, 1, 1, 0] = np.inf
    path = write_dataset(tmp_path / "d.npz", x_test=x_test)

    with pytest.raises(DataError) as err:
        load_npz(path)

    assert "x_test holds 2 non-finite values (NaN or infinity) in 2 samples" in str(err.value)
    assert "first at index [3, 7]" in str(err.value)


def test_load_npz_train_and_test_shapes_must_agree(tmp_path):
    path = write_dataset(tmp_path / "d.npz", x_test=np.zeros((20, 5, 5, 1), dtype="float32"))
    with pytest.raises(DataError, match=r"\(4, 4, 1\), x_test of shape \(5, 5, 1\)"):
        load_npz(path)


def collect(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_make_dataset_batches_every_sample_once():
    x = np.arange(10, dtype="float32").reshape(10, 1)
    y = np.arange(10)

    batches = collect(make_dataset(x, y, batch_size=4, shuffle=False, seed=0))

    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert batches[0][0].shape == (4, 1)
    assert np.concatenate([b[1] for b in batches]).tolist() == list(range(10))


def test_make_dataset_shuffle_is_seeded_and_reshuffles_each_epoch():
    x = np.arange(32, dtype="float32").reshape(32, 1)
    y = np.arange(32)

    def epochs(seed):
        dataset = make_dataset(x, y, batch_size=8, shuffle=True, seed=seed)
        return [np.concatenate([b[1] for b in collect(dataset)]).tolist() for _ in range(2)]

    first, second = epochs(seed=3)
    assert sorted(first) == list(range(32))
    assert first != list(range(32))
    assert first != second  # a new order every epoch
    assert epochs(seed=3) == [first, second]  # the same sequence of epochs for the same seed
    assert epochs(seed=4)[0] != first


def test_make_dataset_rejects_mismatched_lengths_and_bad_batch_size():
    with pytest.raises(DataError, match="x has 3 samples but y has 2"):
        make_dataset(np.zeros((3, 1)), np.zeros(2), batch_size=2, shuffle=False, seed=0)
    with pytest.raises(DataError, match="Received: batch_size=0"):
        make_dataset(np.zeros((3, 1)), np.zeros(3), batch_size=0, shuffle=False, seed=0)


def _labels(dataset):
    return np.concatenate([b[1] for b in collect(dataset)]).tolist()


def test_make_dataset_order_is_a_seeded_shuffle_of_the_samples():
    """The index pipeline gives the order a tf.data shuffle of the (x, y) pairs gives."""
    x = np.arange(40, dtype="float32").reshape(40, 1)
    y = np.arange(40)
    reference = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
        40, seed=42, reshuffle_each_iteration=True
    )
    dataset = make_dataset(x, y, batch_size=16, shuffle=True, seed=42)
    for _ in range(3):
        expected = [int(v) for _, v in reference]
        batches = collect(dataset)
        assert [len(b[1]) for b in batches] == [16, 16, 8]
        got = np.concatenate([b[1] for b in batches]).tolist()
        assert got == expected
        assert [row[0] for b in batches for row in b[0]] == [float(v) for v in got]


def test_array_dataset_views_share_one_shuffle_stream():
    x = np.arange(24, dtype="float32").reshape(24, 1)
    y = np.arange(24)
    features = np.stack([x[:, 0] * 10, -x[:, 0]], axis=1)  # one row per sample, in x's order

    reference = ArrayDataset(x, y, batch_size=8, shuffle=True, seed=3)
    epochs = [_labels(reference.batches()) for _ in range(4)]

    shared = ArrayDataset(x, y, batch_size=8, shuffle=True, seed=3)
    mixed = [_labels(shared.batches()), _labels(shared.with_inputs(features))]
    feature_batches = collect(shared.with_inputs(features))
    mixed.append(np.concatenate([b[1] for b in feature_batches]).tolist())
    mixed.append(_labels(shared.batches()))
    assert mixed == epochs  # epochs continue across views: 1 on x, 2 and 3 on features, 4 on x
    for inputs, labels in feature_batches:
        np.testing.assert_array_equal(inputs, features[labels])
    assert shared.steps == 3 and len(shared) == 24


def test_array_dataset_with_several_inputs_and_a_length_check():
    x = np.arange(10, dtype="float32").reshape(10, 1)
    y = np.arange(10)
    dataset = ArrayDataset(x, y, batch_size=4, shuffle=False, seed=0)
    (a, b), labels = next(iter(dataset.with_inputs([x * 2, x * 3])))
    np.testing.assert_array_equal(a.numpy()[:, 0], labels.numpy() * 2)
    np.testing.assert_array_equal(b.numpy()[:, 0], labels.numpy() * 3)
    with pytest.raises(DataError, match="inputs have 9 rows but the dataset has 10 samples"):
        dataset.with_inputs(x[:9])


def test_check_labels_classification_names_bad_values_and_head_size():
    with pytest.raises(DataError) as err:
        check_labels(np.array([0, 1, 4, 7, 4]), 4, task="classification")
    message = str(err.value)
    assert "labels [4, 7] do not fit the head, which has 4 outputs (valid labels 0..3)" in message
    assert "at least 8 outputs" in message


def test_check_labels_accepts_valid_labels():
    assert check_labels(np.array([2, 0, 1, 2]), 3, task="classification") == [0, 1, 2]
    assert check_labels(np.array([[1.0], [0.0]]), 1, task="binary") == [0, 1]
    assert check_labels(np.array([0.3, 2.5]), 1, task="regression") == []


def test_check_labels_refuses_non_integer_labels_and_names_both_fixes():
    with pytest.raises(DataError) as err:
        check_labels(np.array([0.0, 0.5, 1.0, 0.5]), 3, task="classification", key="d.npz y_train")
    message = str(err.value)
    assert message.startswith("d.npz y_train: classification labels must be integer class ids")
    assert "float64 values such as [0.5]" in message
    assert "set train.task=regression" in message
    with pytest.raises(DataError, match=r"one-hot, store np\.argmax"):
        check_labels(np.eye(3), 3, task="classification")


def test_check_labels_negative_labels_are_never_valid():
    """A label of -1 for a 10-output head: not 'a head with at least 9 outputs'."""
    y = np.array([-1, 0, 3, 8, -1])
    with pytest.raises(DataError) as err:
        check_labels(y, 10, task="classification", key="data.path y_train")
    message = str(err.value)
    assert message.startswith("data.path y_train: labels [-1] are negative")
    assert "a negative label is never valid: labels must be in 0..K-1" in message
    assert "valid labels 0..9, for a head with 10 outputs" in message
    assert "If -1 marks unlabelled samples, drop them." in message
    assert "at least" not in message


def test_check_labels_negative_and_too_large_labels_are_both_named():
    with pytest.raises(DataError) as err:
        check_labels(np.array([-2, -1, 0, 1, 5]), 3, task="classification")
    message = str(err.value)
    assert "labels [-2, -1] are negative" in message and "If -2 marks" not in message
    assert "Also, labels [5] do not fit the head, which has 3 outputs" in message
    assert "at least 6 outputs" in message


def test_check_labels_for_a_one_output_head_points_to_binary():
    with pytest.raises(DataError) as err:
        check_labels(np.array([0, 1, 1]), 1, task="classification")
    message = str(err.value)
    assert "which has 1 output (valid labels 0..0)" in message
    assert "A head with 1 output is for train.task=binary" in message


def test_check_labels_nan_labels_and_class_names():
    with pytest.raises(DataError) as err:
        check_labels(np.array([0.0, np.nan, 1.0]), 3, task="classification")
    assert "classification labels hold 1 NaN or infinite values, in samples [1]" in str(err.value)
    with pytest.raises(DataError) as err:
        check_labels(np.array([1.0, np.inf]), 1, task="binary")
    assert "binary labels hold 1 NaN or infinite values" in str(err.value)
    with pytest.raises(DataError) as err:
        check_labels(np.array(["cat", "dog"]), 2, task="classification")
    assert "received dtype <U3" in str(err.value)
    assert "np.searchsorted(names, y)" in str(err.value)


def test_check_labels_regression_targets_must_be_finite_numbers():
    assert check_labels(np.array([[0.5, 1.0], [2.0, -3.0]]), 2, task="regression") == []
    with pytest.raises(DataError) as err:
        check_labels(np.array([[0.5], [np.nan], [np.inf]]), 1, task="regression", key="y_val")
    assert str(err.value).startswith(
        "y_val: regression targets hold 2 NaN or infinite values, in samples [1, 2]"
    )
    with pytest.raises(DataError, match="regression targets must be numbers; received dtype <U1"):
        check_labels(np.array(["a", "b"]), 1, task="regression")


def test_check_labels_binary():
    with pytest.raises(DataError) as err:
        check_labels(np.array([0, 1, 2]), 1, task="binary")
    message = str(err.value)
    assert "binary labels must be 0 or 1; found [2] among 3 distinct labels [0, 1, 2]" in message
    assert "Set train.task=classification, with a head of 3 softmax outputs" in message
    assert "two classes" not in message
    with pytest.raises(DataError) as err:
        check_labels(np.array([-1, 1, 1]), 1, task="binary")
    assert "found [-1]. Negative labels are never valid." in str(err.value)
    assert "(y == 1).astype('int64')" in str(err.value)
    with pytest.raises(DataError, match=r"found \[2\]\. Map the two classes .* \(y == 2\)"):
        check_labels(np.array([1, 2]), 1, task="binary")
    with pytest.raises(DataError) as err:
        check_labels(np.array([0, 1]), 2, task="binary")
    message = str(err.value)
    assert "train.task=binary needs a head with 1 (sigmoid) output; the head outputs 2" in message
    assert "Set train.task=classification for a 2-way softmax head (labels 0..1)" in message
    with pytest.raises(DataError, match="Unknown task 'ranking'"):
        check_labels(np.array([0, 1]), 2, task="ranking")


def test_file_hash_is_the_md5_dvc_records(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"line\r\n" * 1000 + bytes(range(256)))  # CRLF: DVC 3 hashes raw bytes

    assert file_hash(path) == hashlib.md5(path.read_bytes()).hexdigest()
    assert file_hash(path) == file_md5(str(path))
    with pytest.raises(DataError, match="no such file"):
        file_hash(tmp_path / "missing")


def test_save_npz_is_byte_stable_and_loads_back(tmp_path):
    arrays = {"x": np.arange(12, dtype=">f4").reshape(3, 4), "y": np.array([1, 2, 3])}

    first = save_npz(tmp_path / "a" / "d.npz", arrays)
    second = save_npz(tmp_path / "b" / "d.npz", arrays)

    assert first.read_bytes() == second.read_bytes()
    with np.load(first) as loaded:
        assert loaded["x"].dtype == np.dtype("<f4")
        assert np.array_equal(loaded["x"], arrays["x"])
        assert np.array_equal(loaded["y"], arrays["y"])
    with pytest.raises(DataError, match="dtype object"):
        save_npz(tmp_path / "o.npz", {"x": np.array([None, 1])})
