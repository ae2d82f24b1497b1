"""Every YAML manifest in jobs/ and cluster/ parses; shell scripts pass `bash -n`."""

import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted(list((REPO / "jobs").glob("*.yaml")) + list((REPO / "cluster").rglob("*.yaml")))
SCRIPTS = sorted((REPO / "jobs").glob("*.sh"))


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs
    for d in docs:
        if "apiVersion" in d:
            assert d.get("kind") and d.get("metadata", {}).get("name")


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_scripts_parse(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
