"""One factory for every registration method: `build(name, input_shape, **hparams)`.

A method registers a `Method` subclass with `@register("name")`. The subclass holds the paper's
defaults for every hyper-parameter (architecture and training objective alike), builds the Keras
model, and builds the matching objective, so training code never branches on the model name:

    model = build("mdregnet", (160, 192, 160))
    loss_fn = objective(model)                    # the paper's loss, same hyper-parameters
    outputs = model([moving, fixed])              # dict: 'warped', 'disp', ...
    total, terms = loss_fn(moving, fixed, outputs)

The model's config (method name, input shape, all hyper-parameters) is data:
`model.mdregnet_config`, written as JSON next to the weights by `save` and read back by `load`,
which validates it (`read_config`: known fields, a registered name, hyper-parameters of the
defaults' JSON types, a sane input shape), rebuilds the model by calling the registered builder
and loads the `.weights.h5` arrays after checking they fit it (no pickle, no Keras
`load_model`, no code from the files is executed).
"""

import json
import math
import numbers
import os
import uuid

import numpy as np

from mdregnet.io import InvalidInputError, MissingFileError, atomic_write, relocated_error

_REGISTRY = {}

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
CONFIG_FORMAT = "mdregnet-model-1"
#: The only fields of a model config; anything else (e.g. "__class__", "module") is refused.
CONFIG_FIELDS = ("format", "name", "input_shape", "hparams", "extra")
#: Largest accepted config.json, bytes (a config is a few hundred bytes to a few kB).
MAX_CONFIG_BYTES = 2**20
#: Largest accepted number of voxels of a model's input grid (as `io.load_volume`'s default).
MAX_INPUT_VOXELS = 512**3


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
    """Validates a spatial input shape: 2 or 3 positive integers, at most `MAX_INPUT_VOXELS`
    voxels, each divisible by the method's divisor. Returns it as a tuple of ints; ValueError
    otherwise."""
    method = get_method(name)
    try:
        sizes = list(input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be the 2 or 3 spatial sizes, got {input_shape!r}") \
            from None
    if len(sizes) not in (2, 3) or not all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in sizes):
        raise ValueError(f"input_shape must be the 2 or 3 spatial sizes (positive integers), got "
                         f"{input_shape!r}")
    shape = tuple(int(n) for n in sizes)
    if math.prod(shape) > MAX_INPUT_VOXELS:
        raise ValueError(f"input_shape {shape} has {math.prod(shape)} voxels, more than "
                         f"{MAX_INPUT_VOXELS}")
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

    Both files are first written completely under hidden temporary names in `directory` (each
    through `atomic_write`) and only then renamed into place, the config last: a failure while
    writing (a full disk, ...) leaves no new file and no temporary file behind, and an older model
    in `directory` untouched; a directory this call created is removed again.

    Args:
        model: a model made by `build`.
        directory: created if missing.
        extra: optional JSON-serialisable dict stored under 'extra' (e.g. validation numbers).

    Raises:
        ValueError: `model` was not made by `build`; TypeError: `extra` is not JSON data.
        OSError: a file cannot be written (the message names the final file).
    """
    if not hasattr(model, "mdregnet_config"):
        raise ValueError("model was not built by mdregnet.models.build (no mdregnet_config)")
    directory = os.fspath(directory)
    config = dict(model.mdregnet_config)
    config["format"] = CONFIG_FORMAT
    if extra:
        config["extra"] = extra
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"  # fails before anything is written

    def write_weights(tmp):
        # Keras insists on the suffix; save beside the temp name then move it onto it.
        h5 = tmp + ".weights.h5"
        try:
            model.save_weights(h5)
            os.replace(h5, tmp)
        finally:
            if os.path.exists(h5):
                os.remove(h5)

    def write_config(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staged = {}
    try:
        for name, writer in ((WEIGHTS_FILE, write_weights), (CONFIG_FILE, write_config)):
            staged[name] = os.path.join(directory, f".tmp-{token}-{name}")
            try:
                atomic_write(staged[name], writer)
            except OSError as err:
                final = os.path.join(directory, name)
                raise relocated_error(err, staged[name], final) from err
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(staged.pop(name), os.path.join(directory, name))
    except BaseException:
        for tmp in staged.values():
            try:
                os.remove(tmp)
            except OSError:
                pass
        if created:
            try:
                os.rmdir(directory)
            except OSError:
                pass
        raise


def _json_kind(value):
    """'bool', 'int', 'float', 'str', 'list', 'null' or None (not plain JSON data)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    if value is None:
        return "null"
    return None


def _fits(value, default):
    """Whether a hyper-parameter value has the JSON type of the method's default (an int where
    the default is a float is fine; lists element-wise against the default's elements)."""
    try:  # the default as JSON sees it (tuples are lists)
        default = json.loads(json.dumps(default))
    except (TypeError, ValueError):
        default = None
    kind, want = _json_kind(value), _json_kind(default)
    if kind is None:
        return False
    if kind == "float" and not math.isfinite(value):
        return False
    if want == "null":  # no type to compare with: any plain JSON scalar or list of them
        return kind != "list" or all(_json_kind(v) not in (None, "list") and _fits(v, None)
                                     for v in value)
    if want == "float":
        return kind in ("int", "float")
    if want == "list":
        if kind != "list":
            return False
        return all(_fits(v, default[0] if default else None) for v in value)
    return kind == want


def read_config(directory):
    """Reads and validates a saved model's `config.json` (plain JSON data only; nothing in it is
    imported or executed).

    Checks: the directory and file exist; the file is at most `MAX_CONFIG_BYTES`, UTF-8 JSON, an
    object with exactly the fields `CONFIG_FIELDS` (`extra` optional) and `format`
    "mdregnet-model-1"; `name` is a registered model; `input_shape` is 2 or 3 positive integers
    (at most `MAX_INPUT_VOXELS` voxels); `hparams` is an object whose keys are hyper-parameters
    of that model and whose values have the JSON type of the model's defaults (finite numbers);
    `extra` is an object.

    Returns:
        The config dict.

    Raises:
        MissingFileError (a FileNotFoundError): no directory or no config.json.
        InvalidInputError (a ValueError): anything else above; the message starts with the file.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise MissingFileError(f"{directory}: no such model directory" if not
                               os.path.exists(directory) else
                               f"{directory}: not a directory (a model is a directory written by "
                               "mdregnet.models.save)")
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: no such file (not an mdregnet model directory)")
    if not os.path.isfile(path):
        raise InvalidInputError(f"{path}: not a regular file")
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise InvalidInputError(f"{path}: {size} bytes, too large for a model config (at most "
                                f"{MAX_CONFIG_BYTES})")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        reason = " ".join(str(err).split())[:200]
        raise InvalidInputError(f"{path}: not a readable JSON model config ({type(err).__name__}: "
                                f"{reason})") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise InvalidInputError(f"{path}: not an mdregnet model config (a JSON object with "
                                f"format '{CONFIG_FORMAT}')")
    unknown = sorted(str(k) for k in set(config) - set(CONFIG_FIELDS))
    if unknown:
        raise InvalidInputError(f"{path}: unexpected field(s) {unknown} in a model config (only "
                                f"{', '.join(CONFIG_FIELDS)}; nothing in it is executed)")
    for key, kind in (("name", str), ("input_shape", list), ("hparams", dict)):
        if not isinstance(config.get(key), kind):
            raise InvalidInputError(f"{path}: field {key!r} missing or not a "
                                    f"{ {str: 'string', list: 'list', dict: 'JSON object'}[kind]}")
    if "extra" in config and not isinstance(config["extra"], dict):
        raise InvalidInputError(f"{path}: field 'extra' is not a JSON object")
    name = config["name"]
    if name not in _REGISTRY:
        raise InvalidInputError(f"{path}: unknown model {name!r}; available: "
                                f"{', '.join(available())}")
    try:
        check_input_shape(name, config["input_shape"])
    except ValueError as err:
        raise InvalidInputError(f"{path}: {err}") from None
    defaults_ = _REGISTRY[name].defaults
    unknown = sorted(set(config["hparams"]) - set(defaults_))
    if unknown:
        raise InvalidInputError(f"{path}: unknown hyper-parameter(s) {unknown} for model "
                                f"{name!r}; valid: {sorted(defaults_)}")
    for key, value in config["hparams"].items():
        if not _fits(value, defaults_[key]):
            raise InvalidInputError(
                f"{path}: hyper-parameter {key!r} = {json.dumps(value)[:80]} does not have the "
                f"type of model {name!r}'s default {json.dumps(defaults_[key])} (plain JSON "
                "data, finite numbers)")
    return config


def _weight_shapes(path):
    """Sorted shapes of the arrays stored in a Keras `.weights.h5` file (h5py: data only)."""
    import h5py

    shapes = []

    def visit(_, obj):
        if isinstance(obj, h5py.Dataset):
            shapes.append(tuple(int(n) for n in obj.shape))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return sorted(shapes)


def load(directory, input_shape=None):
    """Rebuilds a saved model from its config and loads its weights.

    Nothing from the files is executed or unpickled: the config is plain JSON validated by
    `read_config`, the model is rebuilt by the registered builder, and the weights are arrays
    read from the `.weights.h5` file (HDF5) into that model's variables. The file must hold
    exactly one array per variable of the model, of the right shape (compared before Keras reads
    it), all finite.

    Args:
        directory: written by `save`.
        input_shape: optionally another spatial size (fully convolutional models accept any size
            divisible by their factor); default the saved one.

    Returns:
        The `keras.Model`, as `build` returns it.

    Raises:
        MissingFileError (a FileNotFoundError): no directory, config.json or weights file.
        InvalidInputError (a ValueError): an invalid config (see `read_config`), a config the
            builder refuses, or weights that do not match the architecture, are not a readable
            HDF5 file or hold NaN/Inf; the message starts with the offending file.
    """
    directory = os.fspath(directory)
    config = read_config(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    _weights_file(directory)  # fails before the model is built
    try:
        model = build(config["name"], input_shape or config["input_shape"], **config["hparams"])
    except (TypeError, ValueError, KeyError, IndexError) as err:
        raise InvalidInputError(f"{config_path}: the model cannot be built from this config "
                                f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") \
            from None
    load_weights(model, directory)
    if "extra" in config:
        model.mdregnet_config["extra"] = config["extra"]
    return model


def _weights_file(directory):
    """The path of the weights file of model directory `directory`; MissingFileError if there is
    none, InvalidInputError if it is not a regular file."""
    weights = os.path.join(os.fspath(directory), WEIGHTS_FILE)
    if not os.path.exists(weights):
        raise MissingFileError(f"{weights}: no such file")
    if not os.path.isfile(weights):
        raise InvalidInputError(f"{weights}: not a regular file")
    return weights


def load_weights(model, directory):
    """Loads the weights of the saved model in `directory` into `model` (a warm start).

    The file must hold exactly one array per variable of `model`, of the same shapes (compared
    before Keras reads it; hyper-parameters that do not change the architecture, such as the
    regularisation weight or the integration grid, may differ from the saved model's), all
    finite. Only the weights file is read (HDF5 arrays, nothing executed).

    Args:
        model: a model made by `build`.
        directory: a model directory written by `save`.

    Raises:
        MissingFileError (a FileNotFoundError): no weights file.
        InvalidInputError (a ValueError): weights of another architecture (the first differing
            shape is named), not a readable HDF5 file, or holding NaN/Inf; the message starts
            with the weights file.
    """
    weights = _weights_file(directory)
    name = getattr(model, "mdregnet_config", {}).get("name", "this")
    try:
        stored = _weight_shapes(weights)
        wanted = sorted(tuple(int(n) for n in v.shape) for v in model.weights)
        if stored != wanted:
            first = next((f"file {a} vs model {b}" for a, b in zip(stored, wanted) if a != b),
                         "")
            raise ValueError(f"the file holds {len(stored)} arrays, the {name!r} model "
                             f"has {len(wanted)} variables"
                             + (f" (shapes differ: {first})" if first else "")
                             + ": weights of another architecture")
        model.load_weights(weights)
    except Exception as err:  # h5py/keras raise many types for a truncated or foreign file
        reason = " ".join(str(err).split())
        if len(reason) > 300:
            reason = reason[:300] + " ..."
        raise InvalidInputError(f"{weights}: cannot load weights ({type(err).__name__}: "
                                f"{reason})") from None
    for variable in model.weights:
        if not np.isfinite(np.asarray(variable)).all():
            raise InvalidInputError(f"{weights}: variable {variable.path!r} holds NaN or Inf")
