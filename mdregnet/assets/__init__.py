"""Image files shipped with the package (provenance and licences in `README.md` beside this file).

- `MNI152_TEMPLATE`: the ICBM 2009a nonlinear symmetric MNI152 T1 brain at 2 mm, in [0, 1]: the
  default template of `mdregnet.preprocess` (`--template mni152`), on whose 80x112x80 grid the
  shipped models were trained.
- `default_pair()`: Colin27 (moving, with its AAL labels) and the MNI152 brain (fixed), both
  preprocessed onto that grid: what `python -m mdregnet.infer` registers when no images are given.

`experiments/build_assets.py` rebuilds every file from the nilearn wheel and Debian's
`mricron-data` package.
"""

import dataclasses
import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
MNI152_TEMPLATE = os.path.join(ASSETS_DIR, "mni152_2009a_brain_2mm.nii.gz")


@dataclasses.dataclass(frozen=True)
class DefaultPair:
    """Paths of the embedded default pair (NIfTI, 80x112x80 voxels at 2 mm, RAS, same affine).

    Attributes:
        moving: Colin27 brain, float in [0, 1] (stored as uint8 with a 1/255 scale factor).
        fixed: MNI152 2009a brain, likewise.
        moving_labels: the AAL parcellation of Colin27 (116 regions, 0 = background), uint8.
    """

    moving: str
    fixed: str
    moving_labels: str


def default_pair():
    """The embedded default pair (`DefaultPair`).

    Raises:
        FileNotFoundError: a file of the pair is missing from the installed package (naming it).
    """
    pair = DefaultPair(moving=os.path.join(ASSETS_DIR, "default_moving.nii.gz"),
                       fixed=os.path.join(ASSETS_DIR, "default_fixed.nii.gz"),
                       moving_labels=os.path.join(ASSETS_DIR, "default_moving_labels.nii.gz"))
    for path in dataclasses.astuple(pair):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing from the mdregnet package (reinstall it, or "
                                    "rebuild with experiments/build_assets.py)")
    return pair
