"""The weights shipped in raysegment/shipped/: checksums, size, and that they segment real ACDC.

The bundled sample's val patients (028, 078) were in the val split when the weights were trained,
so this is a held-out check of the files exactly as shipped.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from raysegment.analysis.metrics import dice_summary, score_records
from raysegment.data.prepare import read_h5_volume
from raysegment.inference.predictor import Predictor
from raysegment.model.weights import SHIPPED_DIR, verify

SAMPLE = Path(__file__).resolve().parents[1] / "raysegment" / "sample"
BACKBONES = ("densenet121", "mobilenet_v2")


def test_checksums_and_sizes():
    results = verify()
    assert set(results) == {f"{b}.safetensors" for b in BACKBONES}
    assert all(results.values()), results
    for b in BACKBONES:
        assert (SHIPPED_DIR / f"{b}.safetensors").stat().st_size < 30e6


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shipped_weights_segment_val_patients(backbone):
    predictor = Predictor.load(f"shipped:{backbone}")
    assert predictor.members[0].config.model.backbone == backbone
    torch.set_num_threads(2)
    records = []
    for path in sorted((SAMPLE / "volumes").glob("patient0[27]8_frame*.h5")):
        v = read_h5_volume(path)
        pred = predictor.predict(v.image)
        assert pred.shape == v.label.shape and pred.dtype == np.uint8
        records += score_records(pred, v.label, v.spacing, distances=False)
    summary = dice_summary(records)
    assert len(records) == 4 * 3  # 2 patients x ED/ES x 3 classes
    assert summary["dice_mean"] > 0.8, summary
