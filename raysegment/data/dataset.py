"""Ray Data over the Parquet shards, batched torch augmentation, whole-volume loading, and the
8-bit bundles (``diagnosis pack``) that carry every volume to a machine without the shards.

Slices are resampled to a square ``image_size`` grid (pixels) on the way in: the SSL4MIS files
carry no spacing, so a fixed grid is the one thing both layouts share. Augmentation samples
parameters first (``sample_augment``), then applies them with one deterministic, batched
``apply_augment`` (a single ``grid_sample`` does scale, rotation, flip and crop).

Imports ``data.prepare`` and ``config``; nothing above ``data`` (not ``model``).
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from raysegment.config import AugmentConfig
from raysegment.data.prepare import Volume

TRAIN_COLUMNS = ["patient", "phase", "slice", "height", "width", "image", "label"]


def train_columns(context_slices: int, pixel_mm: float | None = None) -> list[str]:
    """The shard columns ``resize_batch`` needs (``neighbours`` only for 2.5-D input, ``spacing``
    only for a mm grid)."""
    return TRAIN_COLUMNS + (["neighbours"] if context_slices else []) + (["spacing"] if pixel_mm else [])


# --------------------------------------------------------------------------- resampling


def resize_slice(image: np.ndarray, label: np.ndarray | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (H, W) or (C, H, W) slice → (size, size) / (C, size, size): bilinear image, nearest label."""
    img = torch.from_numpy(np.array(image, np.float32))
    img = F.interpolate(img.reshape(1, -1, *img.shape[-2:]), size=(size, size), mode="bilinear", align_corners=False)
    img = img[0, 0] if image.ndim == 2 else img[0]
    if label is None:
        return img, None
    lab = torch.from_numpy(np.array(label, np.uint8))[None, None].float()
    lab = F.interpolate(lab, size=(size, size), mode="nearest-exact")[0, 0].to(torch.uint8)
    return img, lab


def mm_shape(hw: tuple[int, int], spacing_yx, pixel_mm: float) -> tuple[int, int]:
    """Pixels (y, x) of an (h, w) slice resampled to ``pixel_mm``; unknown spacing keeps the pixels."""
    if spacing_yx is None:
        return int(hw[0]), int(hw[1])
    return (max(1, int(round(hw[0] * float(spacing_yx[0]) / pixel_mm))),
            max(1, int(round(hw[1] * float(spacing_yx[1]) / pixel_mm))))


def pad_or_crop(t: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-pad (zeros) or centre-crop the last two axes of ``t`` to ``size``²."""
    out = t
    for axis in (-2, -1):
        n = out.shape[axis]
        if n > size:
            out = out.narrow(axis, (n - size) // 2, size)
        elif n < size:
            before = (size - n) // 2
            pad = [0, 0, 0, 0]
            pad[0 if axis == -1 else 2], pad[1 if axis == -1 else 3] = before, size - n - before
            out = F.pad(out, pad)
    return out


def grid_slice(image: np.ndarray, label: np.ndarray | None, size: int, spacing_zyx=None,
               pixel_mm: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One slice onto the training grid: stretched to ``size``² (``pixel_mm`` None), or resampled to
    ``pixel_mm`` mm pixels and centre-padded/cropped to ``size``²."""
    if pixel_mm is None:
        return resize_slice(image, label, size)
    shape = mm_shape(image.shape[-2:], None if spacing_zyx is None else spacing_zyx[1:], pixel_mm)
    img = torch.from_numpy(np.array(image, np.float32))
    img = F.interpolate(img.reshape(1, -1, *img.shape[-2:]), size=shape, mode="bilinear", align_corners=False)
    img = pad_or_crop(img, size)
    img = img[0, 0] if image.ndim == 2 else img[0]
    if label is None:
        return img, None
    lab = torch.from_numpy(np.array(label, np.uint8))[None, None].float()
    lab = pad_or_crop(F.interpolate(lab, size=shape, mode="nearest-exact"), size)[0, 0].to(torch.uint8)
    return img, lab


def resize_batch(batch: dict, image_size: int, context_slices: int = 0, pixel_mm: float | None = None) -> dict:
    """Ray Data ``map_batches`` function: flattened variable-size slices → fixed grid arrays.

    Images come out (N, S, S), or (N, 3, S, S) = slices k-1, k, k+1 with ``context_slices=1``.
    """
    images, labels = [], []
    neighbours = batch["neighbours"] if context_slices else [None] * len(batch["image"])
    spacings = batch["spacing"] if pixel_mm else [None] * len(batch["image"])
    for img, nb, lab, h, w, sp in zip(batch["image"], neighbours, batch["label"], batch["height"], batch["width"],
                                      spacings):
        img = np.asarray(img, np.float32).reshape(h, w)
        if context_slices:
            below, above = np.asarray(nb, np.float32).reshape(2, h, w)
            img = np.stack([below, img, above])
        image, label = grid_slice(img, np.asarray(lab, np.uint8).reshape(h, w), image_size, sp, pixel_mm)
        images.append(image.numpy())
        labels.append(label.numpy())
    return {
        "image": np.stack(images),
        "label": np.stack(labels),
        "patient": np.asarray(batch["patient"]),
        "phase": np.asarray(batch["phase"]),
        "slice": np.asarray(batch["slice"]),
    }


def read_split(shards: str | Path, split: str, image_size: int, context_slices: int = 0, pixel_mm: float | None = None):
    """Ray Dataset of one split on the training grid (``grid_slice``), with 2.5-D context if asked."""
    import ray.data

    path = Path(shards) / split
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no '{split}' shards; run raysegment.data.prepare first")
    if context_slices:
        first = next(iter(sorted(path.glob("*.parquet"))), None)
        if first is None or "neighbours" not in pq.read_schema(first).names:
            raise ValueError(f"{path}: shards have no 'neighbours' column (written by an older raysegment.data.prepare); "
                             f"re-run raysegment.data.prepare to train with context_slices={context_slices}")
    if pixel_mm:
        first = next(iter(sorted(path.glob("*.parquet"))), None)
        if first is None or "spacing" not in pq.read_schema(first).names:
            raise ValueError(f"{path}: shards have no 'spacing' column (written by an older raysegment.data.prepare); "
                             f"re-run raysegment.data.prepare to train with pixel_mm={pixel_mm}")
    ds = ray.data.read_parquet(str(path)).select_columns(train_columns(context_slices, pixel_mm))
    ds = ds.map_batches(resize_batch, fn_kwargs={"image_size": image_size, "context_slices": context_slices,
                                                 "pixel_mm": pixel_mm},
                        batch_size=8, batch_format="numpy")
    # Blocks of 8 slices (map_batches alone merges its output into a few blocks of hundreds):
    # streaming_split hands out whole blocks, so they set the balance between workers, and a
    # random block order only mixes patients when a block is a few slices of one.
    return ds.repartition(target_num_rows_per_block=8)


# --------------------------------------------------------------------------- whole volumes


def shard_splits(shards: str | Path) -> list[str]:
    """The splits a local shards folder holds Parquet files of (``train``, ``val``)."""
    return sorted(d.name for d in Path(shards).glob("*") if d.is_dir() and any(d.glob("*.parquet")))


def load_volumes(shards: str | Path, split: str, patients: list[str] | None = None) -> list[Volume]:
    """Reassemble the 3-D volumes of one split (sorted by patient, phase) as normalised ``Volume``s,
    from a shards folder or a ``pack`` bundle (.npz) that records its splits."""
    import pyarrow.compute as pc

    if is_bundle(shards):
        return [v for v in load_bundle(Path(shards), split) if patients is None or v.patient in patients]
    folder = Path(shards) / split
    # Pixels go to numpy straight from Arrow: as Python lists (``to_pylist``) the 160 ACDC volumes
    # took 11 GB and 32 s; the 2.5-D neighbours are not part of a volume and are not read.
    parts = sorted(folder.glob("*.parquet"))
    if not parts:
        held = shard_splits(shards)
        # a source without train.txt / val.txt gives every patient to one split
        hint = f"it holds the {' and '.join(held)} split only" if held else "make them with python -m raysegment.prepare"
        raise FileNotFoundError(f"{shards}: no {split} shards there ({hint})")
    table = pq.read_table(folder, columns=[c for c in pq.read_schema(parts[0]).names if c != "neighbours"])
    if patients is not None:
        table = table.filter(pc.is_in(table["patient"], value_set=pa.array(list(patients), pa.string())))
    meta = table.select([c for c in ("patient", "phase", "slice", "height", "width", "spacing", "group")
                         if c in table.column_names]).to_pylist()
    images = table["image"].combine_chunks()
    labels = table["label"].combine_chunks()
    by_key: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(meta):
        by_key.setdefault((r["patient"], r["phase"]), []).append(i)
    volumes = []
    for (patient, phase), rows in sorted(by_key.items()):
        rows.sort(key=lambda i: meta[i]["slice"])
        first = meta[rows[0]]
        h, w = first["height"], first["width"]
        image = np.stack([np.asarray(images[i].values, np.float32).reshape(h, w) for i in rows])
        label = np.stack([np.asarray(labels[i].values, np.uint8).reshape(h, w) for i in rows])
        sp = first.get("spacing")
        volumes.append(Volume(patient, phase, image, label, tuple(sp) if sp else None, first["group"], source=str(folder)))
    return volumes


# --------------------------------------------------------------------------- augmentation


def sample_augment(labels: torch.Tensor, config: AugmentConfig, crop_size: int, generator: torch.Generator) -> dict:
    """Draw per-sample augmentation parameters for a batch of labels (N, S, S)."""
    n, s = labels.shape[0], labels.shape[-1]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    # Crop centres: a random foreground pixel with probability foreground_prob, else anywhere.
    centres = torch.rand(n, 2, generator=generator) * (s - 1)
    fg_pick = torch.rand(n, generator=generator) < config.foreground_prob
    for i in torch.nonzero(fg_pick).flatten().tolist():
        fg = torch.nonzero(labels[i] > 0)
        if len(fg):
            centres[i] = fg[torch.randint(len(fg), (1,), generator=generator)].float()[0]
    return {
        "zoom": uniform(*config.scale),
        "angle": uniform(-config.rotation_deg, config.rotation_deg) * math.pi / 180,
        "flip": torch.rand(n, generator=generator) < config.flip_prob,
        "centre_yx": centres,
        "int_scale": uniform(*config.intensity_scale),
        "int_shift": uniform(*config.intensity_shift),
        "gamma": uniform(*config.gamma),
        "noise": torch.randn(n, 1, crop_size, crop_size, generator=generator) * config.noise_std,
    }


def apply_augment(images: torch.Tensor, labels: torch.Tensor, params: dict, crop_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic batched augmentation: (N, S, S) or (N, K, S, S) float images and (N, S, S) labels
    → (N, 1 or K, C, C) images, (N, C, C) labels. Every channel of a sample gets the same warp."""
    n, s = images.shape[0], images.shape[-1]
    if images.ndim == 3:
        images = images[:, None]
    device = images.device
    p = {k: v.to(device) for k, v in params.items()}
    ratio = crop_size / s
    cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
    flip = torch.where(p["flip"], -1.0, 1.0)
    k = ratio / p["zoom"]
    centre = (2 * p["centre_yx"] + 1) / s - 1  # pixel → normalised [-1, 1] (align_corners=False)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = k * cos * flip
    theta[:, 0, 1] = -k * sin
    theta[:, 1, 0] = k * sin * flip
    theta[:, 1, 1] = k * cos
    theta[:, 0, 2] = centre[:, 1]
    theta[:, 1, 2] = centre[:, 0]
    grid = F.affine_grid(theta, (n, 1, crop_size, crop_size), align_corners=False)
    img = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    img = img.clamp(0, 1) ** p["gamma"].view(n, 1, 1, 1)
    img = img * p["int_scale"].view(n, 1, 1, 1) + p["int_shift"].view(n, 1, 1, 1) + p["noise"]
    return img, lab[:, 0].round().to(torch.long)


def centre_crop(images: torch.Tensor, labels: torch.Tensor, crop_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """No augmentation: the central crop (for benchmarks and tests). Shapes as ``apply_augment``."""
    s = images.shape[-1]
    a = (s - crop_size) // 2
    if images.ndim == 3:
        images = images[:, None]
    return images[:, :, a : a + crop_size, a : a + crop_size].float(), labels[:, a : a + crop_size, a : a + crop_size].long()


# --------------------------------------------------------------------------- bundles


def is_bundle(data: str | Path) -> bool:
    """Whether ``data`` names a ``pack`` bundle (.npz) rather than a shards folder."""
    return Path(data).suffix == ".npz"


def all_volumes(data: str | Path) -> list[Volume]:
    """Every labelled volume of a shards folder (both splits) or of a ``pack`` bundle (.npz)."""
    if is_bundle(data):
        return load_bundle(Path(data))
    return load_volumes(data, "train") + load_volumes(data, "val")


def pack_bundle(data: str | Path, path: Path) -> list[Volume]:
    """A shards folder's volumes, both splits, → one bundle that records each volume's split
    (``diagnosis pack``); returns the volumes."""
    splits = {s: load_volumes(data, s) for s in ("train", "val")}
    volumes = splits["train"] + splits["val"]
    save_bundle(volumes, path, {v.patient: s for s, vs in splits.items() for v in vs})
    return volumes


def save_bundle(volumes: list[Volume], path: Path, splits: dict[str, str] | None = None) -> None:
    """Volumes in one compressed .npz, images quantised to 8 bits of their normalised [0, 1] range
    (an error ≤ 0.002, a tenth of the training noise): to carry the data to a GPU machine.
    ``splits``: patient → "train"/"val", recorded so that ``load_volumes`` can read one split."""
    arrays, meta = {}, []
    for i, v in enumerate(volumes):
        arrays[f"image{i}"] = np.round(np.clip(v.image, 0, 1) * 255).astype(np.uint8)
        arrays[f"label{i}"] = v.label
        meta.append({"patient": v.patient, "phase": v.phase, "spacing": v.spacing, "group": v.group,
                     "split": (splits or {}).get(v.patient)})
    arrays["meta"] = np.array(json.dumps(meta))
    # LZMA, not savez_compressed's deflate: 48 MB instead of 57 for the 80 ACDC patients, which is what
    # lets them travel to a GPU machine beside the code; np.load reads either
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as z:
        for name, array in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)


def load_bundle(path: Path, split: str | None = None) -> list[Volume]:
    """The volumes of a ``save_bundle`` file (images back in [0, 1], float32); with ``split``, only
    that split's (the bundle must record splits: ``diagnosis pack`` writes them)."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        if split is not None and any(m.get("split") is None for m in meta):
            raise ValueError(f"{path}: this bundle does not record train/val splits (packed before they were); "
                             f"pack it again: python -m raysegment.diagnosis pack --data SHARDS --out {path}")
        return [Volume(m["patient"], m["phase"], z[f"image{i}"].astype(np.float32) / 255, z[f"label{i}"],
                       tuple(m["spacing"]) if m["spacing"] else None, m["group"], source=str(path))
                for i, m in enumerate(meta) if split is None or m["split"] == split]
