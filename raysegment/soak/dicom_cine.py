"""Short-axis cine series written as DICOM MR instances (one file per slice and frame, int16
pixels, an oblique plane): the soak's DICOM studies and the tests' PACS data. Imports pydicom only."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def rotated_orientation(angles_deg=(25.0, -35.0, 10.0)) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) direction cosines of a short-axis plane turned like a real heart's (oblique)."""
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    r = rz @ ry @ rx
    return r[:, 0], r[:, 1]


def _dicom_base(patient: str, study_uid: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"Test^{patient}", patient, "19700101", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20260101", "120000", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
    return ds


def write_dicom_cine(folder: Path, frames_tzyx: np.ndarray, spacing_zyx=(8.0, 1.4, 1.4), patient: str = "P001",
                     study_uid: str | None = None, series_uid: str | None = None, orientation=None,
                     origin=(-80.0, -60.0, 40.0), modality: str = "MR", skip=()) -> list[Path]:
    """A short-axis cine series as single-frame MR instances (one file per slice and frame, named
    by a hash, not by order), int16 pixels, an oblique orientation. ``skip``: (t, z) left out."""
    from pydicom.uid import MRImageStorage, SecondaryCaptureImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_ref = generate_uid()
    row, col = orientation or rotated_orientation()
    normal = np.cross(row, col)
    t_n, z_n, h, w = frames_tzyx.shape
    pixels = np.round(frames_tzyx / max(float(frames_tzyx.max()), 1e-6) * 2000).astype(np.int16)
    paths = []
    for t in range(t_n):
        for z in range(z_n):
            if (t, z) in skip:
                continue
            ds = _dicom_base(patient, study_uid)
            sop = generate_uid()
            ds.SOPClassUID = MRImageStorage if modality == "MR" else SecondaryCaptureImageStorage
            ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, sop
            ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = sop, series_uid, frame_of_ref
            ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 5, t * z_n + z + 1
            ds.SeriesDescription, ds.ImageType = "SA cine", ["ORIGINAL", "PRIMARY", "M"]
            ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *col)]
            ds.ImagePositionPatient = [round(float(v), 4) for v in np.asarray(origin) + normal * z * spacing_zyx[0]]
            ds.PixelSpacing = [spacing_zyx[1], spacing_zyx[2]]
            ds.SliceThickness = spacing_zyx[0]
            ds.TriggerTime, ds.TemporalPositionIdentifier, ds.NumberOfTemporalPositions = 40.0 * t, t + 1, t_n
            ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = h, w, 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.PixelData = pixels[t, z].tobytes()
            path = folder / hashlib_name(sop)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def hashlib_name(uid: str) -> str:
    import hashlib

    return hashlib.sha1(uid.encode()).hexdigest()[:12]  # no extension, no order: found by content
