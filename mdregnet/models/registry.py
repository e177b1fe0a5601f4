"""One factory for every registration method: `build(name, input_shape, **hparams)`.

A method registers a `Method` subclass with `@register("name")`. The subclass holds the paper's
defaults for every hyper-parameter (architecture and training objective alike), builds the Keras
model, and builds the matching objective, so training code never branches on the model name:

    model = build("mdregnet", (160, 192, 160))
    loss_fn = objective(model)                    # the paper's loss, same hyper-parameters
    outputs = model([moving, fixed])              # dict: 'warped', 'disp', ...
    total, terms = loss_fn(moving, fixed, outputs)

The model's config (method name, input shape, all hyper-parameters) is data: `model.mdregnet_config`,
written as JSON next to the weights by `save` and read back by `load`, which rebuilds the model by
calling the registered builder (no pickle, no code from the file is executed).
"""

import json
import os

from mdregnet.io import atomic_write

_REGISTRY = {}

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"


class Method:
    """Base class of a registered method.

    Subclasses set `defaults` (dict of every hyper-parameter with the paper's value) and implement
    `build_model(input_shape, hp)` and `build_objective(hp)`.

    Model contract: a `keras.Model` called as `model([moving, fixed])`, tensors `(B, *spatial, 1)`
    float32 in [0, 1], returning a dict with at least
        'warped'  `(B, *spatial, 1)` moving warped to fixed,
        'disp'    `(B, *spatial, ndims)` full-resolution displacement in voxels (fixed space),
    and for diffeomorphic methods also
        'inverse_disp' `(B, *spatial, ndims)` displacement of the inverse transform (moving space),
        'velocity'     the final SVF in voxels of its own grid.
    Multi-level methods add the tensors their objective needs.

    Objective contract: `objective(moving, fixed, outputs) -> (total, terms)`, `total` a float32
    scalar, `terms` a dict name -> scalar for logging.
    """

    name = None
    defaults = {}
    diffeomorphic = False
    #: total down-sampling factor: input sizes must be divisible by it (per spatial axis)
    divisor = 1

    def build_model(self, input_shape, hp):
        raise NotImplementedError

    def build_objective(self, hp):
        raise NotImplementedError


def register(name):
    """Class decorator: registers a `Method` subclass under `name`."""

    def decorator(cls):
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available():
    """Sorted names of the registered methods."""
    return sorted(_REGISTRY)


def get_method(name):
    """The registered `Method` instance for `name`; ValueError listing the available names."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]()


def resolve_hparams(name, **hparams):
    """The method's defaults updated with `hparams`; unknown keys raise ValueError."""
    method = get_method(name)
    unknown = sorted(set(hparams) - set(method.defaults))
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for model {name!r}; valid: "
                         f"{sorted(method.defaults)}")
    hp = dict(method.defaults)
    hp.update(hparams)
    return hp


def check_input_shape(name, input_shape):
    """Validates a spatial input shape (2D or 3D, divisible by the method's divisor)."""
    method = get_method(name)
    shape = tuple(int(n) for n in input_shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"input_shape must be the 2 or 3 spatial sizes, got {input_shape!r}")
    bad = [n for n in shape if n % method.divisor]
    if bad:
        raise ValueError(f"model {name!r} needs spatial sizes divisible by {method.divisor}, got "
                         f"{shape}; pad or crop first (mdregnet.preprocess)")
    return shape


def build(name, input_shape, **hparams):
    """Builds a registered model.

    Args:
        name: one of `available()`.
        input_shape: spatial size `(X, Y, Z)` (or `(X, Y)` for 2D), without batch and channels;
            each divisible by the method's total down-sampling factor.
        **hparams: overrides of the method's defaults (see `defaults(name)`).

    Returns:
        `keras.Model` with attribute `mdregnet_config` = {'name', 'input_shape', 'hparams'}.

    Raises:
        ValueError: unknown name (the message lists the available ones), unknown hyper-parameter,
            or an input shape the method cannot take.
    """
    hp = resolve_hparams(name, **hparams)
    shape = check_input_shape(name, input_shape)
    model = get_method(name).build_model(shape, hp)
    model.mdregnet_config = {"name": name, "input_shape": list(shape), "hparams": hp}
    return model


def defaults(name):
    """A copy of the paper defaults of model `name`."""
    return dict(get_method(name).defaults)


def objective(model_or_name, **hparams):
    """The training objective matching a built model (or a name plus hyper-parameters)."""
    if isinstance(model_or_name, str):
        name, hp = model_or_name, resolve_hparams(model_or_name, **hparams)
    else:
        config = model_or_name.mdregnet_config
        name, hp = config["name"], dict(config["hparams"])
        hp.update(hparams)
        hp = resolve_hparams(name, **hp)
    return get_method(name).build_objective(hp)


def save(model, directory, extra=None):
    """Saves `config.json` (method, input shape, hyper-parameters) and `model.weights.h5`.

    Both files are written under temporary names in `directory` and renamed into place.

    Args:
        model: a model made by `build`.
        directory: created if missing.
        extra: optional JSON-serialisable dict stored under 'extra' (e.g. validation numbers).
    """
    if not hasattr(model, "mdregnet_config"):
        raise ValueError("model was not built by mdregnet.models.build (no mdregnet_config)")
    os.makedirs(directory, exist_ok=True)
    config = dict(model.mdregnet_config)
    config["format"] = "mdregnet-model-1"
    if extra:
        config["extra"] = extra

    def write_weights(tmp):
        # Keras insists on the suffix; save beside the temp name then move it onto it.
        h5 = tmp + ".weights.h5"
        try:
            model.save_weights(h5)
            os.replace(h5, tmp)
        finally:
            if os.path.exists(h5):
                os.remove(h5)

    atomic_write(os.path.join(directory, WEIGHTS_FILE), write_weights)

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(os.path.join(directory, CONFIG_FILE), write_config)


def read_config(directory):
    """Reads and validates a saved model's `config.json`; ValueError naming the file if bad."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (not an mdregnet model directory)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON model config ({err})") from None
    if not isinstance(config, dict) or config.get("format") != "mdregnet-model-1":
        raise ValueError(f"{path}: not an mdregnet model config (format 'mdregnet-model-1')")
    for key, kind in (("name", str), ("input_shape", list), ("hparams", dict)):
        if not isinstance(config.get(key), kind):
            raise ValueError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    if config["name"] not in _REGISTRY:
        raise ValueError(f"{path}: unknown model {config['name']!r}; available: "
                         f"{', '.join(available())}")
    for value in config["hparams"].values():
        if not isinstance(value, (int, float, str, bool, list, type(None))):
            raise ValueError(f"{path}: hyper-parameter values must be plain JSON data")
    return config


def load(directory, input_shape=None):
    """Rebuilds a saved model from its config and loads its weights.

    Args:
        directory: written by `save`.
        input_shape: optionally another spatial size (fully convolutional models accept any size
            divisible by their factor); default the saved one.

    Returns:
        The `keras.Model`, as `build` returns it.

    Raises:
        FileNotFoundError / ValueError: missing or invalid files, naming the file.
    """
    config = read_config(directory)
    try:
        model = build(config["name"], input_shape or config["input_shape"], **config["hparams"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{os.path.join(directory, CONFIG_FILE)}: {err}") from None
    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: no such file")
    try:
        model.load_weights(weights)
    except Exception as err:  # h5py/keras raise many types for a truncated or foreign file
        raise ValueError(f"{weights}: cannot load weights ({type(err).__name__}: {err})") from None
    if "extra" in config:
        model.mdregnet_config["extra"] = config["extra"]
    return model
