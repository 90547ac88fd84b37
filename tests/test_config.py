"""Config groups compose, the schema catches mistakes before any TensorFlow work."""

from pathlib import Path

import pytest
import yaml
from project_copy import option_files

from tfstack.errors import ConfigError
from tfstack.pipeline.compose import compose, load_params
from tfstack.pipeline.config import to_dict, validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = [
    "data",
    "components",
    "stacking",
    "preprocess",
    "augment",
    "freeze",
    "schedule",
    "train",
    "tracking",
    "experiment",
    "distribute",
]


def _options():
    for group in GROUPS:
        for path in option_files(group):
            yield group, path.stem


def test_every_group_has_the_documented_options():
    options = {}
    for group, option in _options():
        options.setdefault(group, set()).add(option)
    assert {"sequential", "adapter", "functional"} <= options["stacking"]
    assert {"frozen", "joint", "partial"} <= options["freeze"]
    assert {"single", "two_phase", "gradual"} <= options["schedule"]
    assert {"digits", "npz"} <= options["data"]


@pytest.mark.parametrize(("group", "option"), list(_options()))
def test_every_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option != "digits":  # the user's own data: a path to set
        overrides.append(f"data.path=my.{option}")
    if group == "components" and option == "default":  # the user's own files: paths to set
        overrides += ["components.base.path=my_base.keras", "components.head.path=my_head.keras"]
    config = compose(overrides, config_dir=CONF)
    if group == "stacking":
        assert config.stacking.strategy == option
    if group == "freeze":
        assert config.freeze.policy == option
    if group == "schedule":
        assert config.schedule.name == option


def test_experiment_presets_override_several_groups():
    config = compose(["experiment=wide_head"], config_dir=CONF)
    assert config.stacking.strategy == "adapter"
    assert config.components.head.path.endswith("head_wide.keras")
    config = compose(["experiment=fine_tune"], config_dir=CONF)
    assert (config.freeze.policy, config.schedule.name) == ("partial", "two_phase")


def test_stable_interface_keys_exist():
    config = compose(
        [
            "components.base.path=a.keras",
            "components.base.cut_at=conv2",
            "components.base.trust_code=true",
            "components.head.path=b.keras",
            # stacking=adapter: sequential would refuse the adapter it cannot use.
            "stacking=adapter",
            "stacking.adapter=auto",
            "freeze=partial",
            "freeze.unfreeze_last=3",
            "freeze.unfreeze_pattern=conv",
            "data=npz",
            "data.path=x.npz",
            "train.epochs=2",
            "train.batch_size=8",
            "seed=7",
            "tracking.uri=sqlite:////tmp/x.db",
            "tracking.experiment=exp",
        ],
        config_dir=CONF,
    )
    assert config.components.base.cut_at == "conv2" and config.components.base.trust_code
    assert config.freeze.unfreeze_last == 3 and config.data.path == "x.npz"
    assert (config.train.epochs, config.train.batch_size, config.seed) == (2, 8, 7)
    assert config.tracking.experiment == "exp"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], "train.epoch is not a config key. Did you mean train.epochs?"),
        # a mandatory (???) mapping of the schema takes new entries with Hydra's '+'
        (["schedule.lr_multipliers.base=0.1"], "prefix: +schedule.lr_multipliers.base=0.1"),
        (["stacking=stackish"], "Options: ['adapter', 'functional', 'sequential']"),
        (["freeze=thawed"], "freeze=thawed is not an option"),
        (["train.epochs=abc"], "train.epochs"),
        (["train.epochs=0"], "train.epochs=0 must be at least 1"),
        (["train.lr=-1"], "train.lr=-1.0 must be positive"),
        (["train.task=ranking"], "train.task='ranking' is not valid"),
        (["stacking.adapter=sometimes"], "stacking.adapter='sometimes' is not valid"),
        (["data=npz"], "data.path"),
        (["components.head.path="], "components.head.path is not set"),
        (["freeze.unfreeze_pattern=^conv"], """'freeze.unfreeze_pattern="^conv"'"""),
        (["train.jit_compile=always"], "train.jit_compile='always' is not valid. Expected auto"),
        (["train.jit_compile=1"], "train.jit_compile=1 is not valid"),
        # Keras runs no XLA under op determinism: true would be ignored with a warning
        (["train.jit_compile=true"], "Set train.deterministic=false, or train.jit_compile=auto"),
    ],
)
def test_mistakes_fail_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides, config_dir=CONF)
    assert message in str(err.value)


def test_unknown_key_in_a_params_file_is_named(tmp_path):
    params = tmp_path / "params.yaml"
    data = to_dict(compose([], config_dir=CONF))
    data["freeze"]["unfreeze_lats"] = 2
    params.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="freeze.unfreeze_lats is not a config key") as err:
        load_params(params)
    assert "unfreeze_last" in str(err.value)


def test_missing_params_file_says_how_to_make_it(tmp_path):
    with pytest.raises(ConfigError, match="dvc exp run"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.slow
def test_validation_imports_no_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys; from tfstack.pipeline.compose import compose; "
        f"compose([], config_dir={str(CONF)!r}); "
        "print('tensorflow' in sys.modules, 'mlflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_committed_params_yaml_is_what_dvc_composes():
    """plain `dvc repro` uses params.yaml; it must equal DVC's composition of conf/."""
    from dvc.utils.hydra import compose_and_dump

    import tfstack.pipeline.config

    expected = ROOT / ".pytest_cache" / "params_expected.yaml"
    expected.parent.mkdir(exist_ok=True)
    compose_and_dump(expected, str(CONF), None, "config", str(ROOT), [])
    committed = (ROOT / "params.yaml").read_text()
    assert committed == expected.read_text(), "conf/ changed: run `make params`"
    assert tfstack.pipeline.compose.compose_yaml(CONF) == committed
    validate(yaml.safe_load(committed), source="params.yaml")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Non-finite numbers are refused at validation, with the key named.
        (["train.lr=inf"], "train.lr=inf is not a finite number"),
        (["train.lr=nan"], "train.lr=nan is not a finite number"),
        (["schedule.lr_decay=inf"], "schedule.lr_decay=inf is not a finite number"),
        (["schedule.fine_tune_lr_factor=nan"], "schedule.fine_tune_lr_factor=nan is not a finite"),
        (["schedule=gradual", "schedule.lr_multipliers.base=inf"], "lr_multipliers.base=inf"),
        (["data.val_fraction=nan"], "data.val_fraction=nan must be between 0 and 1"),
        # Ranges of every number.
        (["train.lr=0"], "train.lr=0.0 must be positive"),
        (["schedule.fine_tune_lr_factor=0"], "schedule.fine_tune_lr_factor=0.0 must be positive"),
        (["schedule.lr_decay=-0.5"], "schedule.lr_decay=-0.5 must be positive"),
        (["schedule=gradual", "schedule.lr_multipliers.base=0"], "must be positive"),
        (["schedule.fine_tune_epochs=-1"], "schedule.fine_tune_epochs=-1 must be at least 0"),
        (["schedule.unfreeze_last=0"], "schedule.unfreeze_last=0 must be at least 1"),
        (["schedule.stages=1"], "schedule.stages=1 must be at least 2"),
        (["distribute.cpu_replicas=-1"], "distribute.cpu_replicas=-1 must be at least 0"),
        (["demo.pretrain_epochs=0"], "demo.pretrain_epochs=0 must be at least 1"),
        (["train.verbose=3"], "train.verbose=3 is not a Keras verbosity"),
        (["+components.base.input_shape=[]"], "components.base.input_shape=[] is not a shape"),
        # conf/ sets every component key, so no '+' is needed (was: "+...input_shape=VALUE").
        (["components.base.input_shape=[0]"], "components.base.input_shape=[0] is not a shape"),
        # The key the user set, not one derived from it (was: freeze.unfreeze_last=0).
        (["schedule=gradual", "schedule.unfreeze_step=0"], "schedule.unfreeze_step=0 must be"),
        # Keras names, without importing Keras.
        (["train.optimizer=nosuch"], "train.optimizer='nosuch' is not a Keras optimizer"),
        (["train.optimizer=lion"], "'lion' is a Keras optimizer that tfstack does not support"),
        (
            ["train.loss=mse2"],
            "train.loss='mse2' is not a Keras loss. Did you mean train.loss=mse?",
        ),
        (["train.metrics=[accuracy,aucc]"], "train.metrics: 'aucc' is not a Keras metric"),
    ],
)
def test_numbers_and_names_are_checked_at_validation(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides, config_dir=CONF)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # An empty value read as "unset" would silently mean the default.
        (["freeze=partial", "freeze.components=[]"], "freeze.components=[] names no feature"),
        (["stacking=adapter", "stacking.adapter=[]"], "stacking.adapter=[] holds no layer"),
        (["freeze=partial", "freeze.unfreeze_pattern=''"], "freeze.unfreeze_pattern='' is empty"),
        (["tracking.uri=''"], "tracking.uri='' is empty"),
        (["components.base.cut_at=''"], "components.base.cut_at='' is empty"),
        (["output_dir=''"], "output_dir='' is empty"),  # was: outputs in the project root
        # A partial-freeze selector under another policy would be ignored.
        (["freeze.unfreeze_pattern=conv"], "applies only to freeze=partial"),
        (["freeze=joint", "freeze.unfreeze_last=1"], "freeze.unfreeze_last=1 applies only to"),
    ],
)
def test_values_that_would_be_ignored_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides, config_dir=CONF)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Before: accepted, then an offset of nan turned every input into nan.
        (["preprocess=rescale", "preprocess.offset=nan"], "preprocess.offset=nan is not a finite"),
        (["preprocess=rescale", "preprocess.offset=-inf"], "preprocess.offset=-inf is not"),
        # Keys no bound lists: the numbers of layer and callback configs, anywhere in a list.
        (
            ["augment=flip_rotate", "augment.layers.1.config.factor=inf"],
            "augment.layers[1].config.factor=inf is not a finite number",
        ),
        (
            ["train.callbacks=[{class_name: ReduceLROnPlateau, config: {factor: nan}}]"],
            "train.callbacks[0].config.factor=nan is not a finite number",
        ),
    ],
)
def test_a_non_finite_number_anywhere_in_the_config_is_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides, config_dir=CONF)
    assert str(err.value).startswith(message), str(err.value)


def test_keras_names_accepted_without_tensorflow_are_accepted():
    config = compose(
        ["train.loss=ce", "train.metrics=[acc,AUC,mae]", "train.optimizer=sgd"], config_dir=CONF
    )
    assert config.train.metrics == ["acc", "AUC", "mae"]
    # 0 fine-tuning epochs is a valid value: two_phase then has no fine-tuning phase.
    # (schedule=two_phase: schedule=single would refuse the option it does not use.)
    overrides = ["schedule=two_phase", "schedule.fine_tune_epochs=0"]
    assert compose(overrides, config_dir=CONF).schedule.fine_tune_epochs == 0


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("freeze.unfreeze_pattern=conv[12]*", """'freeze.unfreeze_pattern="conv[12]*"'"""),
        ("freeze.unfreeze_pattern=conv(1|2)", """'freeze.unfreeze_pattern="conv(1|2)"'"""),
        ('freeze.unfreeze_pattern=a"b[', """'freeze.unfreeze_pattern='"'"'a"b['"'"''"""),
    ],
)
def test_an_unparsable_override_is_named_with_how_to_quote_it(override, suggestion):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    with pytest.raises(ConfigError) as err:
        compose(["freeze=partial", override], config_dir=CONF)
    message = str(err.value)
    assert f"Cannot parse the override {override!r}" in message
    assert message.endswith(suggestion)
    # What the shell passes for the suggestion is what Hydra reads back as the intended value.
    (passed,) = shlex.split(suggestion)
    parsed = OverridesParser.create().parse_overrides([passed])[0]
    assert parsed.value() == override.split("=", 1)[1]


def test_an_override_that_is_not_key_value_says_so():
    with pytest.raises(ConfigError, match=r"Cannot parse the override '\(': an override is KEY="):
        compose(["("], config_dir=CONF)


def test_modules_without_trust_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match=r"components.base.modules=\[mypkg.layers\] imports"):
        compose(["components.base.modules=[mypkg.layers]"], config_dir=CONF)
    trusted = ["components.base.modules=[mypkg.layers]", "components.base.trust_code=true"]
    assert compose(trusted, config_dir=CONF).components.base.modules == ["mypkg.layers"]


def test_jit_compile_takes_auto_true_and_false():
    assert compose([], config_dir=CONF).train.jit_compile == "auto"
    for value, expected in (("true", True), ("false", False)):
        overrides = [f"train.jit_compile={value}", "train.deterministic=false"]
        assert compose(overrides, config_dir=CONF).train.jit_compile is expected
