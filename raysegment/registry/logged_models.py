"""Logging a registered version's MLflow pyfunc model: its signature (the contract callers rely on),
the checkpoint files it carries, and MLflow's log call without its input-example reminder; the same
for the diagnosis classifier's pyfunc.

Imports ``analysis.diagnosis`` (the classifier's columns) and no other raysegment module; the pyfunc
code itself (``pyfunc_model.py``, ``pyfunc_diagnosis.py``) is loaded by MLflow.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np


def pyfunc_signature():
    """The segmentation pyfunc's contract: a float32 (z, y, x) volume in, a uint8 mask out, and its params."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        # (z, y, x) mm of the volume, when known: the RV contact distance is then in mm, as in infer.
        # How the rows and columns lie (config.IN_PLANE or "auto"), as infer's --in-plane.
        params=ParamSchema([ParamSpec("spacing_mm", "double", [], (-1,)), ParamSpec("in_plane", "string", "auto")]),
    )


SEGMENTER_PACKAGES = ("raysegment", "torch", "torchvision", "numpy")
DIAGNOSIS_PACKAGES = ("raysegment", "numpy", "pandas")


def pinned_requirements(packages) -> list[str]:
    """``NAME==VERSION`` of each package as installed here (a local tag such as ``+cpu`` dropped, so a
    GPU host gets the same release): an environment MLflow builds for the model (``mlflow models
    serve`` / ``build-docker`` without ``--env-manager local``) then masks as this one does, not
    with whatever torch is newest. A package not installed here stays unpinned."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in packages:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def diagnosis_model_kwargs(model_file: str | Path) -> dict:
    """``mlflow.pyfunc.log_model``/``save_model`` arguments of the diagnosis pyfunc of a JSON
    classifier: every column it reads optional (rows of indices or of features; other columns are
    dropped), one feature row of training medians as the example."""
    import pandas as pd
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from raysegment.analysis.diagnosis import FEATURES, INDEX_KEYS, load

    columns = dict.fromkeys([*INDEX_KEYS, "bsa_m2", *FEATURES])
    return {"python_model": str(Path(__file__).with_name("pyfunc_diagnosis.py")),
            "artifacts": {"diagnosis": str(model_file)},
            "signature": ModelSignature(inputs=Schema([ColSpec("double", c, required=False) for c in columns])),
            "input_example": pd.DataFrame([load(model_file).fill], columns=list(FEATURES)),
            "pip_requirements": pinned_requirements(DIAGNOSIS_PACKAGES)}


CHECKPOINT_FILES = ("model.pt", "config.json", "state.json")  # the optimizer state is training-only


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in CHECKPOINT_FILES:
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    return dst


def log_model_quietly(**kwargs) -> str:
    """``mlflow.pyfunc.log_model(**kwargs)`` without MLflow's input-example reminder → model URI.

    Our models carry an explicit signature (a whole volume makes a poor example). MLflow's other
    reminder, on type hints, cannot be filtered here (it is raised under its own ``catch_warnings``);
    the pyfunc files avoid it with input hints MLflow infers no schema from."""
    import warnings

    import mlflow

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
        return mlflow.pyfunc.log_model(**kwargs).model_uri


def log_pyfunc(artifacts: dict[str, str]) -> str:
    """Log the pyfunc model (defined from code, ``pyfunc_model.py``) with these artifact folders → URI."""
    return log_model_quietly(name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                             artifacts=artifacts, signature=pyfunc_signature(),
                             pip_requirements=pinned_requirements(SEGMENTER_PACKAGES))


def log_checkpoint_model(checkpoint_dir: str | Path) -> str:
    """Log the checkpoint (state dict + config) as a pyfunc model in the active/new run → model URI."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _copy_checkpoint(Path(checkpoint_dir), Path(tmp) / "checkpoint")
        return log_pyfunc({"checkpoint": str(ckpt)})
