"""raysegment: cardiac MRI segmentation (ACDC) on Ray Train, Ray Tune and MLflow."""

from __future__ import annotations

import os

__version__ = "0.1.0"

CLASS_NAMES = {1: "rv", 2: "myo", 3: "lv"}
NUM_CLASSES = 4


def disable_telemetry() -> None:
    """Switch off Ray usage stats and MLflow telemetry for this process and its children.

    Medical users expect no phoning home; every CLI entry point calls this before it starts
    Ray or MLflow. Values already set by the user win.
    """
    for key, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "RAY_TRAIN_V2_ENABLED": "1",
    }.items():
        os.environ.setdefault(key, value)
