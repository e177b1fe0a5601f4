"""Registration models behind one factory: `build(name, input_shape, **hparams)`.

Importing this package registers every method (one file per method); `available()` lists them.
"""

from mdregnet.models.registry import (Method, available, build, defaults, get_method, load,
                                      load_weights, objective, read_config, register, save)

# Each import registers one method.
from mdregnet.models import fcn_ds, mdregnet, prdfe, voxelmorph  # noqa: E402
from mdregnet.models import patch_fcn  # noqa: E402,F401  (patch_fcn)
from mdregnet.models import variational  # noqa: E402,F401  (vjl_sn, vjl_lunet)

__all__ = ["Method", "available", "build", "defaults", "get_method", "load", "load_weights",
           "objective",
           "read_config", "register", "save", "fcn_ds", "mdregnet", "prdfe", "voxelmorph"]
