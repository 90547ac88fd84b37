"""Which parts of a model file carry code, and importing the modules a trusted component names.

A model file is data until Keras deserializes it. Some of what it can hold is code: a Lambda layer
(marshalled Python bytecode), a `TFSMLayer` (it loads and runs an external SavedModel), a
`TorchModuleWrapper` (a pickle), and any class that is not a Keras builtin (its Python code runs
once Keras finds it). `find_code` scans a serialized model config for those before Keras sees it,
so `tfstack.components` can refuse an untrusted file, and `tfstack.pipeline` can tell which
component of a stacked model each element belongs to. A TensorFlow SavedModel directory is code
as a whole (its graph can read and write files); `tfstack.components` refuses it by format.

tfstack's own registered classes (the `Cast` adapter layer, the per-component-rate optimizers)
are not user code and are never reported.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import keras

from tfstack.errors import ComponentError, describe_error

# Keras builtin layers that carry code: class_name -> what the message says about them.
CODE_LAYERS = {
    "Lambda": "which runs arbitrary code",
    "TFSMLayer": "which loads and runs an external SavedModel",
    "TorchModuleWrapper": "which unpickles a PyTorch module",
    "JaxLayer": "which calls a Python function",
    "FlaxLayer": "which calls a Python module",
}
# Packages whose classes Keras imports by itself, from the module named in the config.
KERAS_IMPORTED_PACKAGES = ("keras_hub", "keras_cv", "keras_nlp")
MAX_NAMED = 3  # elements named per kind in one message; the rest are counted


@dataclass(frozen=True)
class CodeElement:
    """One code-bearing element of a serialized model config."""

    kind: str  # "lambda_layer", "lambda", "code_layer", "custom_class" or "custom_function"
    class_name: str
    name: str | None = None  # the layer's name, when it has one
    module: str | None = None  # the Python module the config names
    registered_name: str | None = None  # the name it was registered under
    detail: str | None = None  # e.g. the SavedModel a TFSMLayer loads

    @property
    def lookup_name(self) -> str:
        """The name Keras looks the class up by in its registry of custom objects."""
        return self.registered_name or self.class_name

    def origin(self) -> str:
        """`registered as pkg>Name, module pkg.layers`, from what the config says."""
        parts = [f"registered as {self.lookup_name}"]
        parts.append(f"module {self.module}" if self.module else "module not recorded")
        return ", ".join(parts)


@dataclass(frozen=True)
class TrustOptions:
    """How the user sets trust and modules, for the fix a message names.

    Attributes:
        trust_code: The setting that trusts the file, e.g. `components.base.trust_code=true`.
        modules: The setting that imports modules, with `{modules}` where their names go.
    """

    trust_code: str
    modules: str

    @classmethod
    def for_key(cls, key: str) -> TrustOptions:
        """The config keys of component `key` (e.g. `components.base`)."""
        return cls(trust_code=f"{key}.trust_code=true", modules=f"{key}.modules=[{{modules}}]")

    def modules_fix(self, modules: Iterable[str | None]) -> str:
        """The modules setting, filled with the modules named (or a placeholder)."""
        named = sorted({module for module in modules if module})
        return self.modules.format(modules=",".join(named) or "your.module")


def find_code(config: object, *, include_compile: bool = True) -> list[CodeElement]:
    """Every code-bearing element of a serialized Keras model config, in document order.

    Args:
        config: A model config as read from a `.keras` file's `config.json` or an `.h5` file's
            `model_config` (Keras 3 or Keras 2), or any part of one.
        include_compile: Also scan `compile_config` (the optimizer, loss and metrics), which
            Keras deserializes only when it loads with `compile=True`.

    Returns:
        The elements found; an empty list for a model of Keras builtins only.
    """
    found = []
    pending = [config]  # an explicit stack: a deeply nested config must not hit Python's limit
    while pending:
        value = pending.pop()
        if isinstance(value, list):
            pending.extend(reversed(value))
            continue
        if not isinstance(value, dict):
            continue
        element = _classify(value)
        if element is not None:
            found.append(element)
            if element.kind in ("lambda_layer", "code_layer"):
                continue  # its function or SavedModel is that element; nothing more to name
        children = [
            child for field, child in value.items() if include_compile or field != "compile_config"
        ]
        pending.extend(reversed(children))
    return found


def find_code_by_component(
    stacked_config: object, component_names: Iterable[str], *, include_compile: bool = True
) -> dict[str | None, list[CodeElement]]:
    """Code-bearing elements of a stacked model, by the component whose sub-model holds them.

    Each component is a top-level layer of the stacked model named after it; elements outside
    every component (an adapter, an intermediate layer) are listed under None.

    Args:
        stacked_config: The stacked model's serialized config.
        component_names: The names of the components (the top-level sub-models).
        include_compile: As for `find_code`.

    Returns:
        Component name (or None) -> its code-bearing elements; only owners with elements.
    """
    names = set(component_names)
    owned: dict[str | None, list[CodeElement]] = {}
    inner = stacked_config.get("config") if isinstance(stacked_config, dict) else None
    layers = inner.get("layers") if isinstance(inner, dict) else None
    if not isinstance(layers, list):
        # Not a Sequential or Functional config: nothing can be attributed to a component.
        found = find_code(stacked_config, include_compile=include_compile)
        return {None: found} if found else {}
    for layer in layers:
        name = _layer_name(layer) if isinstance(layer, dict) else None
        owner = name if name in names else None
        elements = find_code(layer, include_compile=include_compile)
        if elements:
            owned.setdefault(owner, []).extend(elements)
    rest = {field: value for field, value in stacked_config.items() if field != "config"}
    rest["config"] = {field: value for field, value in inner.items() if field != "layers"}
    if elements := find_code(rest, include_compile=include_compile):
        owned.setdefault(None, []).extend(elements)
    return owned


def describe_code(elements: Sequence[CodeElement]) -> str:
    """`a Lambda layer (double), which runs arbitrary code, and a custom class ...`."""
    groups: dict[tuple[str, str], list[CodeElement]] = {}
    for element in elements:
        groups.setdefault((element.kind, element.class_name), []).append(element)
    phrases = []
    for (kind, class_name), group in groups.items():
        shown = group[:MAX_NAMED]
        more = f" and {len(group) - MAX_NAMED} more" if len(group) > MAX_NAMED else ""
        if kind == "lambda_layer":
            names = ", ".join(e.name or "?" for e in shown)
            phrases.append(f"a Lambda layer ({names}{more}), {CODE_LAYERS['Lambda']}")
        elif kind == "code_layer":
            names = ", ".join(e.name or "?" for e in shown)
            detail = f" {shown[0].detail}" if shown[0].detail else ""
            phrases.append(f"a {class_name} ({names}{more}), {CODE_LAYERS[class_name]}{detail}")
        elif kind == "lambda":
            phrases.append("a serialized Python lambda, which runs arbitrary code")
        else:
            what = "custom class" if kind == "custom_class" else "custom function"
            layer_names = ", ".join(e.name for e in shown if e.name)
            names = f"layer {layer_names}{more}; " if layer_names else ""
            phrases.append(
                f"a {what} {class_name} ({names}{shown[0].origin()}), whose Python code runs "
                "when it loads"
            )
    return ", and ".join(phrases)


def refusal_message(subject: str, elements: Sequence[CodeElement], *, options: TrustOptions) -> str:
    """One line refusing untrusted code.

    Args:
        subject: What holds it, e.g. `components.base.path=models/base.keras`.
        elements: What `find_code` found in it.
        options: How the user trusts it.
    """
    custom = [e for e in elements if e.kind.startswith("custom_")]
    modules = f" and {options.modules_fix(e.module for e in custom)}" if custom else ""
    return (
        f"{subject} holds {describe_code(elements)}; tfstack loads untrusted files with "
        f"safe_mode=True and refuses code in them. If you trust this file, set "
        f"{options.trust_code}{modules}."
    )


def unresolved(elements: Sequence[CodeElement]) -> list[CodeElement]:
    """The custom classes and functions no imported module has registered with Keras."""
    missing = []
    for element in elements:
        if not element.kind.startswith("custom_"):
            continue
        package = (element.module or "").split(".", maxsplit=1)[0]
        if package in KERAS_IMPORTED_PACKAGES:
            continue  # Keras imports these from the module the config names
        if keras.saving.get_registered_object(element.lookup_name) is None:
            missing.append(element)
    return missing


def unknown_class_message(
    subject: str, elements: Sequence[CodeElement], *, options: TrustOptions
) -> str:
    """One line for custom classes that Keras would not find (instead of its config dump)."""
    described = "; ".join(
        f"{element.class_name} ({element.origin()})" for element in elements[:MAX_NAMED]
    )
    more = f" and {len(elements) - MAX_NAMED} more" if len(elements) > MAX_NAMED else ""
    return (
        f"{subject} uses custom classes that no imported module registers with Keras: "
        f"{described}{more}. Set {options.modules_fix(e.module for e in elements)} (with "
        f"{options.trust_code}) to import the module that defines them with "
        f"@keras.saving.register_keras_serializable()."
    )


def import_modules(modules: Sequence[str], *, trusted: bool, options: TrustOptions) -> None:
    """Import the user's modules that register custom Keras classes.

    Importing runs the module's code, so it needs trust. The working directory is searched too
    (after the installed packages), as `python -m` would, so a project's own module is found.

    Args:
        modules: Dotted module names.
        trusted: Whether the component trusts code (`trust_code=true`).
        options: How the user sets trust and modules, for the messages.

    Raises:
        ComponentError: Modules without trust, or a module that cannot be imported.
    """
    if not modules:
        return
    setting = options.modules_fix(modules)
    if not trusted:
        raise ComponentError(
            f"{setting} imports Python code, which needs {options.trust_code}; set it only if "
            f"you trust these modules and the component's file."
        )
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # an import runs arbitrary code: any exception can come out
            raise ComponentError(
                f"{setting}: module {module!r} cannot be imported ({describe_error(err)}). "
                "Make it importable from the working directory or PYTHONPATH, or "
                f"fix the name."
            ) from err


# --- classifying one serialized object ----------------------------------------------------------


def _classify(node: dict) -> CodeElement | None:
    """The code-bearing element a serialized object is, or None for data and Keras builtins."""
    class_name = node.get("class_name")
    if not isinstance(class_name, str) or "config" not in node:
        return None
    module = node.get("module") if isinstance(node.get("module"), str) else None
    registered = node.get("registered_name")
    registered = registered if isinstance(registered, str) else None
    name = _layer_name(node)
    if class_name == "__lambda__":
        return CodeElement("lambda", class_name)
    if class_name.startswith("__") and class_name.endswith("__"):
        return None  # tensors, arrays, bytes, slices, type specs: data
    if class_name in CODE_LAYERS:
        kind = "lambda_layer" if class_name == "Lambda" else "code_layer"
        inner = node["config"] if isinstance(node["config"], dict) else {}
        filepath = inner.get("filepath") if class_name == "TFSMLayer" else None
        return CodeElement(kind, class_name, name, module, registered, filepath)
    if _is_tfstack_class(registered or class_name):
        return None
    if _is_builtin(class_name, module, registered):
        return None
    kind = "custom_function" if class_name == "function" else "custom_class"
    if kind == "custom_function" and isinstance(node["config"], str):
        class_name = node["config"]
    if registered is None and ">" in class_name:
        # Keras 2 and Keras 3 .h5 files name a registered class by its registered name.
        registered, class_name = class_name, class_name.split(">")[-1]
    return CodeElement(kind, class_name, name, module, registered)


def _is_builtin(class_name: str, module: str | None, registered: str | None) -> bool:
    if class_name == "function" and module in ("builtins", None) and ">" not in str(registered):
        return True  # a Keras activation or loss saved by name
    if registered is not None and ">" in registered:
        return False
    if module is not None:
        return module == "keras" or module.startswith("keras.")
    # Legacy .h5 configs name no module: Keras resolves the class among its own by name.
    return ">" not in class_name and class_name in _legacy_builtin_names()


def _layer_name(node: dict) -> str | None:
    inner = node.get("config")
    name = inner.get("name") if isinstance(inner, dict) else None
    name = name if name is not None else node.get("name")
    return name if isinstance(name, str) else None


def _is_tfstack_class(registered: str) -> bool:
    """tfstack's own registered classes, defined in tfstack's modules (not the user's)."""
    if not registered.startswith("tfstack>"):
        return False
    import tfstack.adapters  # noqa: F401  (registers Cast)
    import tfstack.schedules  # noqa: F401  (registers the per-component-rate optimizers)

    found = keras.saving.get_registered_object(registered)
    return found is not None and getattr(found, "__module__", "").startswith("tfstack.")


_LEGACY_NAMESPACES = (
    "layers",
    "models",
    "initializers",
    "regularizers",
    "constraints",
    "activations",
    "dtype_policies",
    "losses",
    "metrics",
    "optimizers",
)
_legacy_names: frozenset[str] | None = None


def _legacy_builtin_names() -> frozenset[str]:
    """Class names a legacy .h5 config can use for Keras builtins (e.g. Dense, GlorotUniform)."""
    global _legacy_names
    if _legacy_names is None:
        names = {"Functional", "Policy"}  # Keras 2's mixed-precision policy class
        for namespace in _LEGACY_NAMESPACES:
            module = getattr(keras, namespace)
            names.update(n for n in dir(module) if isinstance(getattr(module, n), type))
        _legacy_names = frozenset(names - set(CODE_LAYERS))
    return _legacy_names
