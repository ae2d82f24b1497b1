"""report compare: paired Dice of two models, a bootstrap CI that resamples whole patients, and its
command line on real (tiny) models and on records.json files."""

import json

import numpy as np
import pytest
from conftest import write_checkpoint
from synth import make_h5_dataset, write_info_csv

from raysegment.analysis.levels import level_records, level_slices
from raysegment.analysis.paired import bootstrap_ci, dice_ci, error_ci, paired_dice, paired_errors, paired_levels
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


def _heart(rv_slices) -> np.ndarray:
    """(6, 20, 20) labels: LV cavity and myocardium on every slice, RV on ``rv_slices``."""
    lab = np.zeros((6, 20, 20), np.uint8)
    lab[:, 4:14, 10:18] = 2
    lab[:, 6:12, 12:16] = 3
    lab[list(rv_slices), 5:13, 2:8] = 1
    return lab


def test_paired_levels_charge_a_missed_apical_slice_and_a_stray_blob_to_the_apex():
    ref = _heart(range(6))
    apex = level_slices(ref)["apex"]
    missed = ref.copy()
    missed[apex[0]][missed[apex[0]] == 1] = 0  # A misses one apical RV slice whole; B draws every one
    no_apical_rv = _heart([k for k in range(6) if k not in apex])
    stray = no_apical_rv.copy()
    stray[apex[0], 15:19, 2:6] = 1  # A draws RV where the reference has none at the apex; B draws none
    sp = (10.0, 1.5, 1.5)
    levels_a, levels_b = [], []
    for patient, (r, pa, pb) in {"p1": (ref, missed, ref), "p2": (ref, missed, ref),
                                 "p3": (no_apical_rv, stray, no_apical_rv)}.items():
        levels_a += level_records(pa, r, sp, split="val", patient=patient, phase="ED")
        levels_b += level_records(pb, r, sp, split="val", patient=patient, phase="ED")
    rows = {(r["level"], r["class"]): r for r in paired_levels(levels_a, levels_b, resamples=200)}
    dice_a = [r["dice"] for r in levels_a if (r["level"], r["class"]) == ("apex", "rv")]
    row = rows[("apex", "rv")]
    # p3's apex scores 0 for A's blob and 1 for B, who, like the reference, draws no RV there.
    assert row["volumes"] == 3 and dice_a[2] == 0.0 and row["b"] == 1.0
    assert row["a"] == pytest.approx((dice_a[0] + dice_a[1]) / 3) and dice_a[0] < 1.0
    assert (row["missed_a"], row["missed_b"], row["extra_a"], row["extra_b"]) == (2, 0, 1, 0)
    assert row["ci_low"] > 0 and row["diff"] == pytest.approx(row["b"] - row["a"])
    for key in (("base", "rv"), ("mid", "rv"), ("apex", "lv"), ("mid", "myo")):
        assert (rows[key]["diff"], rows[key]["ci_low"], rows[key]["ci_high"]) == (0.0, 0.0, 0.0), key
    other = level_records(ref, _heart(range(5)), sp, split="val", patient="p1", phase="ED")
    with pytest.raises(ValueError, match="reference differs at p1/ED/"):
        paired_levels(levels_a[:9], other)


@pytest.fixture
def two_models(tmp_path, tiny_model):
    """Two tiny checkpoints: A, and B the same network with its head's bias moved, so its masks differ."""
    import torch

    model, config = tiny_model
    a = write_checkpoint(tmp_path / "a", model, config)
    with torch.no_grad():
        model.head.bias.add_(torch.tensor([0.0, 0.3, -0.2, 0.1]))
    return a, write_checkpoint(tmp_path / "b", model, config)


@pytest.fixture
def shards(tmp_path):
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2, 3), val=(2, 3), shape=(3, 40, 48))
    prepare(PrepareConfig(source=src, out=tmp_path / "shards", progress=False))
    return tmp_path / "shards"


def test_compare_command_on_models_and_on_records(tmp_path, two_models, shards, capsys):
    a, b = two_models
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


def test_compare_by_level_on_models_and_on_evaluate_output(tmp_path, two_models, shards, capsys):
    a, b = two_models
    common = ["--b", str(b), "--data", str(shards), "--resamples", "200", "--by-level"]
    assert report_cli.main(["compare", "--a", str(a), *common, "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    levels = saved["levels"]
    assert {r["level"] for r in levels} <= {"base", "mid", "apex"} and any(abs(r["diff"]) > 0.01 for r in levels)
    first = levels[0]
    assert (f"| {first['level']} | {first['class'].upper()} | {first['volumes']} | {first['a']:.3f} | {first['b']:.3f} |"
            in printed and "slices missed A / B" in (tmp_path / "cmp" / "compare.md").read_text())
    # A as `report evaluate --by-level --out` wrote it: the same level rows.
    assert report_cli.main(["evaluate", "--model", str(a), "--data", str(shards), "--splits", "val", "--by-level",
                            "--out", str(tmp_path / "eval-a")]) == 0
    assert report_cli.main(["compare", "--a", str(tmp_path / "eval-a" / "records.json"), *common,
                            "--out", str(tmp_path / "cmp2")]) == 0
    again = json.loads((tmp_path / "cmp2" / "compare.json").read_text())["levels"]
    assert [(r["level"], r["class"], r["volumes"], r["missed_a"]) for r in again] == \
        [(r["level"], r["class"], r["volumes"], r["missed_a"]) for r in levels]
    assert [r["diff"] for r in again] == pytest.approx([r["diff"] for r in levels])
    capsys.readouterr()
    (tmp_path / "eval-a" / "levels.json").unlink()
    assert report_cli.main(["compare", "--a", str(tmp_path / "eval-a" / "records.json"), *common]) == 2
    assert report_cli.main(["compare", "--a", str(a), "--b", str(b), "--metric", "clinical", "--by-level"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: no levels.json beside {tmp_path / 'eval-a' / 'records.json'}: write it with "
        "`report evaluate --by-level --out`", "error: --by-level applies to --metric dice only"]


def test_compare_refuses_bad_input_in_one_line(tmp_path, tiny_model, capsys):
    a = write_checkpoint(tmp_path / "a", *tiny_model)
    (tmp_path / "other.json").write_text(json.dumps({"not": "records"}))
    assert report_cli.main(["compare", "--a", str(tmp_path / "other.json"), "--b", str(a)]) == 2
    assert report_cli.main(["compare", "--a", str(a), "--b", str(a)]) == 2
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text("{}")  # --data itself is checked first (cli.args.check_data)
    assert report_cli.main(["compare", "--a", str(a), "--b", str(a), "--data", str(tmp_path / "s"), "--resamples", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'other.json'} is not the records.json of `report evaluate --out`",
                   f"error: --data is needed to score {a}",
                   "error: resamples must be at least 100, got 5"]


# --------------------------------------------------------------------------- clinical indices


def _clinical(errors: dict[str, float], ref: float = 60.0, index: str = "lv_ef_pct") -> list[dict]:
    """clinical_records-shaped rows: patient → signed error of ``index`` against ``ref``."""
    return [{"patient": p, "group": "NOR", f"pred_{index}": ref + e, f"ref_{index}": ref} for p, e in errors.items()]


def test_paired_errors_compare_absolute_errors_patient_by_patient():
    errors_a = {"p1": 2.0, "p2": -3.0, "p3": 1.0, "p4": 4.0}
    errors_b = {"p1": 1.0, "p2": -1.5, "p3": -0.5, "p4": 2.0}  # every |error| halved, one sign flipped
    result = paired_errors(_clinical(errors_a), _clinical(errors_b), ["lv_ef_pct"], resamples=2000)
    (row,) = result["rows"]
    assert (row["n"], row["mae_a"], row["mae_b"], row["diff"]) == (4, 2.5, 1.25, -1.25)
    assert (row["bias_a"], row["bias_b"]) == (1.0, 0.25)
    assert (row["b_closer"], row["a_closer"]) == (4, 0)
    # The CI of the mean of the halved errors (−1, −1.5, −0.5, −2) lies within their range, below 0.
    assert -2.0 <= row["ci_low"] < row["diff"] < row["ci_high"] <= -0.5
    assert result["per_patient"][1] == {"patient": "p2", "group": "NOR", "ref": {"lv_ef_pct": 60.0},
                                        "a": {"lv_ef_pct": 57.0}, "b": {"lv_ef_pct": 58.5}}
    # A patient with no value on one side (NaN: e.g. an empty ED mask) is left out of that index only.
    nan_b = _clinical(errors_b)
    nan_b[0]["pred_lv_ef_pct"] = float("nan")
    row = paired_errors(_clinical(errors_a), nan_b, ["lv_ef_pct"], resamples=500)["rows"][0]
    assert (row["n"], row["mae_a"], row["diff"]) == (3, pytest.approx(8 / 3), pytest.approx(4 / 3 - 8 / 3))


def test_paired_errors_refuse_sides_that_are_not_of_the_same_patients_or_reference():
    a = _clinical({"p1": 1.0, "p2": 2.0})
    with pytest.raises(ValueError, match="only B: p3"):
        paired_errors(a, _clinical({"p1": 1.0, "p2": 2.0, "p3": 0.0}), ["lv_ef_pct"])
    with pytest.raises(ValueError, match="reference lv_ef_pct differ for p1: not the same data"):
        paired_errors(a, _clinical({"p1": 1.0, "p2": 2.0}, ref=55.0), ["lv_ef_pct"])
    with pytest.raises(ValueError, match="patient p1 has no pred_rv_ef_pct, ref_rv_ef_pct"):
        paired_errors(a, a, ["rv_ef_pct"])
    with pytest.raises(ValueError, match="patient p1 appears twice on one side"):
        paired_errors(a + a[:1], a, ["lv_ef_pct"])


def test_one_models_mae_ci_brackets_its_mae_and_leaves_out_nan_patients():
    records = _clinical({"p1": 2.0, "p2": -3.0, "p3": 1.0, "p4": 4.0})
    mae, low, high = error_ci(records, ["lv_ef_pct"], resamples=2000)["lv_ef_pct"]
    assert mae == 2.5 and 1.0 <= low < mae < high <= 4.0
    records[3]["pred_lv_ef_pct"] = float("nan")
    assert error_ci(records, ["lv_ef_pct"], resamples=500)["lv_ef_pct"][0] == 2.0
    alike = _clinical({"p1": 1.5, "p2": -1.5, "p3": 1.5})
    assert error_ci(alike, ["lv_ef_pct"], resamples=500)["lv_ef_pct"] == (1.5, 1.5, 1.5)
    # signed: the bias (mean of ours − reference) and its interval, which may hold 0.
    bias, low, high = error_ci(alike, ["lv_ef_pct"], resamples=2000, signed=True)["lv_ef_pct"]
    assert bias == pytest.approx(0.5) and -1.5 <= low < 0 < bias < high <= 1.5
    assert error_ci(alike[:1], ["lv_ef_pct"], resamples=500, signed=True)["lv_ef_pct"] == (1.5, 1.5, 1.5)


@pytest.fixture
def clinical_shards(tmp_path):
    """Tiny shards with spacing and metadata (info.csv), as `report clinical` needs."""
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2, 3), val=(2, 3), shape=(3, 40, 48))
    write_info_csv(src, {f"patient00{p}": ("NOR", 170, 70, 20, 1, 8, 3, 1.5, 8.0) for p in (1, 2, 3)})
    prepare(PrepareConfig(source=src, out=tmp_path / "shards", progress=False))
    return tmp_path / "shards"


def test_compare_clinical_on_models_and_on_a_clinical_csv(tmp_path, two_models, clinical_shards, capsys):
    from raysegment.reporting.report import CLINICAL_INDICES

    a, b = two_models
    data = ["--data", str(clinical_shards), "--resamples", "200", "--mask-cache", str(tmp_path / "cache")]
    out = tmp_path / "cmp"
    assert report_cli.main(["compare", "--metric", "clinical", "--a", str(a), "--b", str(b), *data,
                            "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "compare.json").read_text())
    assert (saved["metric"], saved["patients"], [r["index"] for r in saved["rows"]]) == ("clinical", 2, list(CLINICAL_INDICES))
    assert any(abs(r["diff"]) > 0.01 for r in saved["rows"] if r["n"])  # the moved bias changed the masks
    rv = saved["rows"][3]  # this random tiny net: A finds no RV, B finds too much
    assert (rv["n"], rv["a_closer"]) == (2, 2) and rv["mae_b"] > rv["mae_a"] > 0
    assert f"| rv_edv_ml | 2 | {rv['mae_a']:.2f} | {rv['mae_b']:.2f} | +{rv['diff']:.2f} |" in printed
    ef = saved["rows"][2]  # an EF of an empty ED mask is NaN: that index has no patient, said so
    assert ef["n"] == 0 and "| lv_ef_pct | 0 | — | — |" in printed
    assert (ef["diff"], saved["per_patient"][0]["a"]["lv_ef_pct"]) == (None, None)  # strict JSON: null, not NaN
    json.loads((out / "compare.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in compare.json"))
    assert (out / "paired.png").read_bytes()[:4] == b"\x89PNG" and "paired.png" in (out / "compare.md").read_text()
    # A as the clinical.csv `report clinical --out` wrote: the same values, so the same B − A.
    assert report_cli.main(["clinical", "--model", str(a), "--data", str(clinical_shards), "--splits", "val", "--ci",
                            "--out", str(tmp_path / "clin-a")]) == 0
    # --ci: A's MAE as compare measured it, with its interval (2 patients whose RV errors differ).
    md = (tmp_path / "clin-a" / "clinical.md").read_text()
    assert "| index | n | MAE [95 % CI] | bias (ours − ref) [95 % CI] |" in md
    assert f"| rv_edv_ml | 2 | {rv['mae_a']:.2f} [" in md and f"] | {rv['bias_a']:+.2f} [" in md
    assert report_cli.main(["compare", "--metric", "clinical", "--a", str(tmp_path / "clin-a" / "clinical.csv"),
                            "--b", str(b), *data, "--out", str(tmp_path / "cmp2")]) == 0
    again = json.loads((tmp_path / "cmp2" / "compare.json").read_text())
    assert json.dumps([r["diff"] for r in again["rows"]]) == json.dumps([r["diff"] for r in saved["rows"]])
    # A model against itself: no patient measured closer by either.
    assert report_cli.main(["compare", "--metric", "clinical", "--a", str(a), "--b", str(a), *data,
                            "--out", str(tmp_path / "cmp3")]) == 0
    same = json.loads((tmp_path / "cmp3" / "compare.json").read_text())
    assert all((r["b_closer"], r["a_closer"]) == (0, 0) for r in same["rows"])
    # Each metric refuses the other's file, in one line.
    capsys.readouterr()
    assert report_cli.main(["compare", "--metric", "clinical", "--a", str(tmp_path / "x.json"), "--b", str(a)]) == 2
    assert report_cli.main(["compare", "--a", str(tmp_path / "clin-a" / "clinical.csv"), "--b", str(a)]) == 2
    assert report_cli.main(["compare", "--a", str(a), "--b", str(b), "--basal-check", "shipped", *data]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'x.json'} holds Dice, not clinical indices: give the model, or the clinical.csv of "
        "`report clinical --out`",
        f"error: {tmp_path / 'clin-a' / 'clinical.csv'} holds clinical indices, not Dice: add --metric clinical",
        "error: --basal-check applies to --metric clinical only"]
