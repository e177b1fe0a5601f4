"""Registration models behind one factory: `build(name, input_shape, **hparams)`.

Importing this package registers every method; `available()` lists them.
"""

from mdregnet.models.registry import (Method, available, build, defaults, get_method, load,
                                      objective, read_config, register, save)

# Each import registers one method (one file per method).
from mdregnet.models import mdregnet as _mdregnet  # noqa: F401,E402
from mdregnet.models import voxelmorph as _voxelmorph  # noqa: F401,E402
from mdregnet.models import prdfe as _prdfe  # noqa: F401,E402
from mdregnet.models import fcn_ds as _fcn_ds  # noqa: F401,E402

__all__ = ["Method", "available", "build", "defaults", "get_method", "load", "objective",
           "read_config", "register", "save"]
