"""report compare: paired Dice of two models, a bootstrap CI that resamples whole patients, and its
command line on real (tiny) models and on records.json files."""

import json

import numpy as np
import pytest
from conftest import write_checkpoint
from synth import make_h5_dataset

from raysegment.analysis.paired import bootstrap_ci, dice_ci, paired_dice
from raysegment.cli import report as report_cli
from raysegment.data.prepare import PrepareConfig, prepare


def _records(dice: dict[tuple[str, str], tuple[float, float, float]], split: str = "val") -> list[dict]:
    """score_records-shaped rows: (patient, phase) → Dice RV, MYO, LV."""
    return [{"split": split, "patient": p, "phase": ph, "class": c, "dice": d, "unit": "mm"}
            for (p, ph), ds in dice.items() for c, d in zip(("rv", "myo", "lv"), ds)]


def _volumes(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {(f"patient{i:03d}", ph): tuple(rng.uniform(0.7, 0.95, 3)) for i in range(1, n + 1) for ph in ("ED", "ES")}


def test_a_uniform_gain_is_found_exactly_with_a_ci_of_zero_width():
    a = _volumes(6)
    b = {k: tuple(x + 0.02 for x in v) for k, v in a.items()}
    result = paired_dice(_records(a), _records(b), resamples=500)
    assert (result["patients"], result["volumes"]) == (6, 12)
    for row in result["rows"]:
        assert row["diff"] == pytest.approx(0.02) and row["b"] - row["a"] == pytest.approx(0.02)
        assert row["ci_low"] == pytest.approx(0.02) and row["ci_high"] == pytest.approx(0.02)
        assert (row["b_better"], row["a_better"], row["equal"]) == (12, 0, 0)


def test_a_patients_two_volumes_are_drawn_together():
    # Each patient gains at ED what it loses at ES: any draw of whole patients averages to exactly 0,
    # while drawing volumes one by one would not.
    a = _volumes(5)
    b = {(p, ph): tuple(x + (0.05 if ph == "ED" else -0.05) for x in v) for (p, ph), v in a.items()}
    rv = paired_dice(_records(a), _records(b), resamples=2000)["rows"][0]
    assert rv["diff"] == pytest.approx(0.0, abs=1e-12)
    assert rv["ci_low"] == pytest.approx(0.0, abs=1e-12) and rv["ci_high"] == pytest.approx(0.0, abs=1e-12)
    assert (rv["b_better"], rv["a_better"]) == (5, 5)


def test_the_ci_agrees_with_a_plain_bootstrap_loop():
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(10), 2)
    diffs = rng.normal(0.01, 0.03, 20)
    low, high = bootstrap_ci(diffs, groups, 20000, np.random.default_rng(0))
    loop = np.random.default_rng(1)
    stats = []
    for _ in range(20000):
        drawn = loop.choice(10, 10)
        stats.append(np.concatenate([diffs[groups == g] for g in drawn]).mean())
    assert (low, high) == pytest.approx(tuple(np.percentile(stats, [2.5, 97.5])), abs=0.002)
    assert low < diffs.mean() < high


def test_one_models_ci_brackets_its_mean_and_narrows_to_nothing_when_patients_agree():
    spread = _volumes(8)
    ci = dice_ci(_records(spread), resamples=1000)
    assert ci["rv"][0] == pytest.approx(np.mean([v[0] for v in spread.values()]))
    assert all(lo < mean < hi for mean, lo, hi in ci.values())
    alike = {k: (0.9, 0.8, 0.95) for k in spread}
    assert dice_ci(_records(alike), resamples=1000)["mean"] == pytest.approx((0.8833333, 0.8833333, 0.8833333))


def test_sides_that_scored_different_volumes_or_classes_are_refused():
    a = _volumes(3)
    b = dict(a)
    b[("patient009", "ES")] = (0.9, 0.9, 0.9)
    with pytest.raises(ValueError, match="only B: patient009/ES"):
        paired_dice(_records(a), _records(b))
    no_lv = [r for r in _records(a) if not (r["patient"] == "patient002" and r["class"] == "lv")]
    with pytest.raises(ValueError, match="patient002/E[DS] has no Dice for lv"):
        paired_dice(no_lv, _records(a))


@pytest.fixture
def shards(tmp_path):
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2, 3), val=(2, 3), shape=(3, 40, 48))
    prepare(PrepareConfig(source=src, out=tmp_path / "shards", progress=False))
    return tmp_path / "shards"


def test_compare_command_on_models_and_on_records(tmp_path, tiny_model, shards, capsys):
    import torch

    model, config = tiny_model
    a = write_checkpoint(tmp_path / "a", model, config)
    with torch.no_grad():  # B: the same network with its head's bias moved, so its masks differ
        model.head.bias.add_(torch.tensor([0.0, 0.3, -0.2, 0.1]))
    b = write_checkpoint(tmp_path / "b", model, config)
    assert report_cli.main(["evaluate", "--model", str(a), "--data", str(shards), "--splits", "val", "--ci",
                            "--out", str(tmp_path / "eval-a")]) == 0
    mean_all = capsys.readouterr().out.split("| val | all | ")[1].split(" | ")[3]  # the table's Dice mean
    assert "val: Dice with 95 % CI, patients resampled (10000 draws): RV " in (tmp_path / "eval-a" / "table.md").read_text()
    assert f"mean {mean_all} [" in (tmp_path / "eval-a" / "table.md").read_text()
    out = tmp_path / "cmp"
    assert report_cli.main(["compare", "--a", str(a), "--b", str(b), "--data", str(shards), "--resamples", "200",
                            "--out", str(out), "--label-b", "moved bias"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "compare.json").read_text())
    assert any(abs(r["diff"]) > 0.01 for r in saved["rows"])  # the moved bias changed the masks
    assert (saved["patients"], saved["volumes"], saved["b"]) == (2, 4, "moved bias")
    assert f"| mean | {saved['rows'][3]['a']:.3f} | {saved['rows'][3]['b']:.3f} |" in printed
    assert (out / "paired.png").read_bytes()[:4] == b"\x89PNG" and "paired.png" in (out / "compare.md").read_text()
    # A as the records.json `report evaluate --out` wrote: the same Dice, so B − A is the same.
    assert report_cli.main(["compare", "--a", str(tmp_path / "eval-a" / "records.json"), "--b", str(b),
                            "--data", str(shards), "--resamples", "200", "--out", str(tmp_path / "cmp2")]) == 0
    again = json.loads((tmp_path / "cmp2" / "compare.json").read_text())
    assert [r["diff"] for r in again["rows"]] == pytest.approx([r["diff"] for r in saved["rows"]])
    # A model against itself: every volume equal.
    assert report_cli.main(["compare", "--a", str(a), "--b", str(a), "--data", str(shards), "--resamples", "200",
                            "--out", str(tmp_path / "cmp3")]) == 0
    same = json.loads((tmp_path / "cmp3" / "compare.json").read_text())
    assert all((r["diff"], r["ci_low"], r["ci_high"], r["equal"]) == (0.0, 0.0, 0.0, 4) for r in same["rows"])


def test_compare_refuses_bad_input_in_one_line(tmp_path, tiny_model, capsys):
    a = write_checkpoint(tmp_path / "a", *tiny_model)
    (tmp_path / "other.json").write_text(json.dumps({"not": "records"}))
    assert report_cli.main(["compare", "--a", str(tmp_path / "other.json"), "--b", str(a)]) == 2
    assert report_cli.main(["compare", "--a", str(a), "--b", str(a)]) == 2
    assert report_cli.main(["compare", "--a", str(a), "--b", str(a), "--data", "x", "--resamples", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'other.json'} is not the records.json of `report evaluate --out`",
                   f"error: --data is needed to score {a}",
                   "error: resamples must be at least 100, got 5"]
