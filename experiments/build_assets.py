"""Builds the files shipped in `mdregnet/assets/` from public packages (never from ../shared/data).

    python experiments/build_assets.py --mni_t1 MNI.nii.gz --colin_dir DIR [--out mdregnet/assets]

Sources (both redistributable, see `mdregnet/assets/README.md`):
- `--mni_t1`: the ICBM 2009a nonlinear symmetric MNI152 T1 brain bundled in the nilearn wheel,
  `nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz` (nilearn 0.14.1;
  `pip download --no-deps nilearn==0.14.1` and unzip it). 1 mm, 197x233x189, skull-stripped.
- `--colin_dir`: `/usr/share/mricron/templates` of Debian's `mricron-data` package
  (`apt-get download mricron-data && dpkg -x mricron-data_*.deb x`): `ch2bet.nii.gz` (Colin27,
  the MNI single subject, skull-stripped, 1 mm) and `aal.nii.gz` (its AAL parcellation, 116
  regions).

Writes (8-bit images with a NIfTI scale factor, to stay small):
- `mni152_2009a_brain_2mm.nii.gz`: the MNI152 brain at 2 mm on its own field of view, normalised
  to [0, 1]: the default template of `mdregnet.preprocess` (`--template mni152`).
- `default_fixed.nii.gz`: that template on the 80x112x80 2 mm grid the shipped models were
  trained on (the grid `mdregnet.preprocess` derives from the template).
- `default_moving.nii.gz`, `default_moving_labels.nii.gz`: Colin27 and its AAL labels,
  preprocessed exactly like the training subjects (normalised, affine to the template with
  SimpleITK, resampled onto the same grid).
"""

import argparse
import os
import tempfile

import nibabel as nib
import numpy as np

from mdregnet import preprocess

SHAPE = (80, 112, 80)
SPACING = 2.0


def _save_uint8(path, image, affine):
    """Saves a [0, 1] image as uint8 with scl_slope 1/255 (nibabel returns float on load)."""
    data = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0 / 255.0, 0.0)
    img.header["descrip"] = b"mdregnet asset"
    nib.save(img, path)


def _save_labels(path, labels, affine):
    img = nib.Nifti1Image(np.asarray(labels).astype(np.uint8), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"mdregnet asset (AAL labels)"
    nib.save(img, path)


def build(mni_t1, colin_dir, out):
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # 1. The template at 2 mm on its own field of view (no alignment: template=None).
        mni_mask = os.path.join(tmp, "mni_mask.nii.gz")
        img = nib.load(mni_t1)
        nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine),
                 mni_mask)
        own = preprocess.load_template(mni_t1)
        fov = tuple(int(np.ceil(n * z / SPACING / 16.0) * 16)
                    for n, z in zip(img.shape, img.header.get_zooms()[:3]))
        full = preprocess.preprocess_subject(mni_t1, tmp, "mni_full", mask_path=mni_mask,
                                             template=None, shape=fov, spacing=SPACING,
                                             mask_dilation=0,
                                             grid=preprocess.target_grid(own, fov, SPACING))
        template_path = os.path.join(out, "mni152_2009a_brain_2mm.nii.gz")
        full_img = nib.load(full["image"])
        _save_uint8(template_path, full_img.get_fdata(), full_img.affine)

        # 2. The model grid, derived from the shipped template as `mdregnet.preprocess` does.
        template = preprocess.load_template(template_path)
        grid = preprocess.target_grid(template, SHAPE, SPACING)
        print(grid.description)
        fixed = preprocess.preprocess_subject(mni_t1, tmp, "fixed", mask_path=mni_mask,
                                              template=None, mask_dilation=0, grid=grid)
        fixed_img = nib.load(fixed["image"])
        _save_uint8(os.path.join(out, "default_fixed.nii.gz"), fixed_img.get_fdata(),
                    fixed_img.affine)

        # 3. Colin27 preprocessed like a training subject (brain mask = the BET brain > 0).
        colin = os.path.join(colin_dir, "ch2bet.nii.gz")
        colin_mask = os.path.join(tmp, "colin_mask.nii.gz")
        cimg = nib.load(colin)
        nib.save(nib.Nifti1Image((np.asarray(cimg.dataobj) > 0).astype(np.uint8), cimg.affine),
                 colin_mask)
        aal = nib.load(os.path.join(colin_dir, "aal.nii.gz"))
        aal_path = os.path.join(tmp, "aal.nii.gz")
        # The AAL labels outside the BET mask are kept: labels > 0 are not the brain mask here.
        nib.save(nib.Nifti1Image(np.asarray(aal.dataobj).astype(np.int32), cimg.affine), aal_path)
        moving = preprocess.preprocess_subject(colin, tmp, "moving", label_path=aal_path,
                                               mask_path=colin_mask, template=template,
                                               mask_dilation=0, grid=grid)
        print(f"Colin27 -> MNI152 affine: scale {moving['scale']:.3f}, "
              f"{moving['iterations']} iterations, warnings {moving['warnings']}")
        mimg = nib.load(moving["image"])
        _save_uint8(os.path.join(out, "default_moving.nii.gz"), mimg.get_fdata(), mimg.affine)
        limg = nib.load(moving["labels"])
        _save_labels(os.path.join(out, "default_moving_labels.nii.gz"),
                     np.asarray(limg.dataobj), limg.affine)
    for name in sorted(os.listdir(out)):
        print(f"{os.path.join(out, name)}: {os.path.getsize(os.path.join(out, name))} bytes")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mni_t1", required=True)
    parser.add_argument("--colin_dir", required=True)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "mdregnet",
                                                      "assets"))
    args = parser.parse_args()
    build(args.mni_t1, args.colin_dir, args.out)


if __name__ == "__main__":
    main()
