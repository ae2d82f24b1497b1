"""Small synthetic ACDC-like data for tests: official NIfTI layout and SSL4MIS h5 layout."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")


def synthetic_volume(seed: int, shape=(4, 40, 48), lv_radius: float = 7.0):
    """(image float in [0, 1], label uint8) of shape (z, y, x): LV disc, MYO ring, RV blob."""
    rng = np.random.default_rng(seed)
    z, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    label = np.zeros(shape, np.uint8)
    cy, cx = h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)
    for k in range(z):
        r = lv_radius * (1.0 - 0.12 * k)
        d = np.hypot(yy - cy, xx - cx)
        label[k][d < r + 3] = 2
        label[k][d < r] = 3
        drv = np.hypot((yy - cy) / 1.3, xx - (cx - r - 8))
        label[k][(drv < r * 0.8) & (label[k] == 0)] = 1
    image = 0.1 + 0.25 * (label == 2) + 0.6 * (label == 3) + 0.5 * (label == 1)
    image = image + rng.normal(0, 0.05, shape)
    image = (image - image.min()) / (image.max() - image.min())
    return image.astype(np.float32), label


def write_nifti(path: Path, zyx: np.ndarray, spacing_zyx, dtype=None) -> None:
    """Write a (z, y, x) array as NIfTI (x, y, z) with the given spacing."""
    arr = np.transpose(zyx, (2, 1, 0))
    if dtype is not None:
        arr = arr.astype(dtype)
    affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
    img = nib.Nifti1Image(arr, affine)
    img.header.set_zooms((spacing_zyx[2], spacing_zyx[1], spacing_zyx[0]))
    nib.save(img, str(path))


def make_nifti_patient(root: Path, number: int, ed: int = 1, es: int = 7, nframes: int = 10,
                       group: str = "NOR", spacing=(10.0, 1.5, 1.25), shape=(4, 40, 48)) -> Path:
    """Official layout: root/training/patientNNN/{Info.cfg, _4d, _frameFF, _frameFF_gt}."""
    pdir = root / "training" / f"patient{number:03d}"
    pdir.mkdir(parents=True, exist_ok=True)
    (pdir / "Info.cfg").write_text(
        f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: 180.0\nNbFrame: {nframes}\nWeight: 80.0\n"
    )
    frames = {}
    for phase, frame in (("ED", ed), ("ES", es)):
        image, label = synthetic_volume(number * 10 + frame, shape, lv_radius=7.0 if phase == "ED" else 5.0)
        frames[frame] = (image, label)
        write_nifti(pdir / f"patient{number:03d}_frame{frame:02d}.nii.gz", (image * 3000).astype(np.int16), spacing)
        write_nifti(pdir / f"patient{number:03d}_frame{frame:02d}_gt.nii.gz", label, spacing, np.uint8)
    cine = np.stack([frames.get(t + 1, frames[ed])[0] for t in range(nframes)], axis=-1)  # (z,y,x,t)
    img4d = nib.Nifti1Image((np.transpose(cine, (2, 1, 0, 3)) * 3000).astype(np.int16),
                            np.diag([spacing[2], spacing[1], spacing[0], 1.0]))
    nib.save(img4d, str(pdir / f"patient{number:03d}_4d.nii.gz"))
    return pdir


def drop_info_lines(patient_dir: Path, *keys: str) -> None:
    """Info.cfg without its ``keys`` lines (``Group``, ``Height``, …): a test set's, an anonymised one's."""
    cfg = patient_dir / "Info.cfg"
    cfg.write_text("".join(line for line in cfg.read_text().splitlines(True) if not line.startswith(keys)))


def make_nifti_dataset(root: Path, n: int = 4, shape=(4, 40, 48)) -> Path:
    for i in range(1, n + 1):
        make_nifti_patient(root, i, group=GROUPS[(i - 1) % len(GROUPS)], shape=shape)
    return root


def write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)


def write_info_csv(src: Path, rows: dict[str, tuple]) -> None:
    """``src/info.csv`` as ``../shared/acdc`` has it: patient → (group, height_cm, weight_kg, nb_frames,
    ed_frame, es_frame, num_slices, pixel_spacing_mm, slice_spacing_mm)."""
    lines = ["patient,group,height_cm,weight_kg,nb_frames,ed_frame,es_frame,num_slices,pixel_spacing_mm,slice_spacing_mm"]
    lines += [f"{p}," + ",".join(map(str, r)) for p, r in rows.items()]
    (src / "info.csv").write_text("\n".join(lines) + "\n")


def make_h5_dataset(root: Path, patients=(1, 2, 3, 4), val=(4,), shape=(4, 40, 48)) -> Path:
    vol = root / "volumes"
    vol.mkdir(parents=True, exist_ok=True)
    for p in patients:
        for frame in (1, 2):
            image, label = synthetic_volume(p * 10 + frame, shape, lv_radius=7.0 if frame == 1 else 5.0)
            write_h5(vol / f"patient{p:03d}_frame0{frame}.h5", image, label)
    (root / "train.txt").write_text("".join(f"patient{p:03d}\n" for p in patients if p not in val))
    (root / "val.txt").write_text("".join(f"patient{p:03d}\n" for p in val))
    return root


from raysegment.soak.dicom_cine import hashlib_name, rotated_orientation, write_dicom_cine  # noqa: E402,F401


def sample_cine(patient: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A bundled-sample patient as a two-frame cine (ED, ES): images and labels (2, z, y, x) and its
    true spacing (z, y, x mm) from the sample's info.csv."""
    import csv

    sample = Path(__file__).resolve().parents[1] / "raysegment" / "sample"
    images, labels = [], []
    for frame in (1, 2):
        with h5py.File(sample / "volumes" / f"{patient}_frame0{frame}.h5", "r") as f:
            images.append(f["image"][()])
            labels.append(f["label"][()])
    row = next(r for r in csv.DictReader(open(sample / "info.csv")) if r["patient"] == patient)
    px = float(row["pixel_spacing_mm"])
    return np.stack(images), np.stack(labels).astype(np.uint8), (float(row["slice_spacing_mm"]), px, px)


COMPRESSED = ("JPEGLosslessProcess14_1", "JPEGLSLossless", "JPEG2000Lossless", "RLELossless")  # what PACS archives hold


def compress_dicom(src, dst, syntax: str) -> None:
    """Re-encode one instance's pixel data in a lossless compressed transfer syntax (GDCM)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
