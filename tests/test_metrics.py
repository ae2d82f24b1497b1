import numpy as np
import pytest
from medpy.metric import binary as medpy_binary

from raysegment.analysis.metrics import aggregate, dice, dice_summary, score_records, score_volume, surface_distances


def random_mask(rng, shape=(6, 24, 20), p=0.3):
    from scipy import ndimage
    noise = ndimage.gaussian_filter(rng.random(shape), 1.5)
    return noise > np.quantile(noise, 1 - p)


def test_perfect_match_is_one_and_zero_distance():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = random_mask(rng)
        assert dice(m, m) == 1.0
        assert surface_distances(m, m, (5.0, 1.2, 1.2)) == (0.0, 0.0)


def test_empty_cases_are_defined():
    empty = np.zeros((4, 10, 10), bool)
    full = np.zeros((4, 10, 10), bool)
    full[1:3, 2:5, 2:5] = True
    assert dice(empty, empty) == 1.0
    assert surface_distances(empty, empty) == (0.0, 0.0)
    assert dice(empty, full) == 0.0 and dice(full, empty) == 0.0
    diag = np.sqrt(4**2 + 10**2 + 10**2)
    assert surface_distances(full, empty) == pytest.approx((diag, diag))
    diag_mm = np.sqrt((4 * 10) ** 2 + 15**2 + 15**2)
    assert surface_distances(empty, full, (10.0, 1.5, 1.5)) == pytest.approx((diag_mm, diag_mm))


def test_symmetry():
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = random_mask(rng), random_mask(rng)
        assert dice(a, b) == pytest.approx(dice(b, a))
        assert surface_distances(a, b, (8.0, 1.0, 1.5)) == pytest.approx(surface_distances(b, a, (8.0, 1.0, 1.5)))


def test_known_shift_distance():
    a = np.zeros((3, 20, 20), bool)
    a[:, 5:10, 5:10] = True
    b = np.roll(a, 2, axis=2)
    hd, assd = surface_distances(a, b, (1.0, 1.0, 0.5))
    assert hd == pytest.approx(1.0)  # 2 voxels x 0.5 mm
    assert dice(a, b) == pytest.approx(2 * 3 * 5 * 3 / (2 * 75))


@pytest.mark.parametrize("seed", range(8))
def test_cross_check_against_medpy(seed):
    rng = np.random.default_rng(seed)
    a, b = random_mask(rng), random_mask(rng, p=0.2)
    spacing = tuple(rng.uniform(0.5, 8.0, 3))
    hd, assd = surface_distances(a, b, spacing)
    assert dice(a, b) == pytest.approx(medpy_binary.dc(a, b))
    assert hd == pytest.approx(medpy_binary.hd95(a, b, voxelspacing=spacing))
    assert assd == pytest.approx(medpy_binary.assd(a, b, voxelspacing=spacing))


def test_score_volume_units_and_aggregation():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 4, (4, 16, 16))
    pred = gt.copy()
    pred[0] = 0
    rows = []
    for patient in ("p1", "p2"):
        for phase in ("ED", "ES"):
            rows += score_records(pred, gt, (10.0, 1.0, 1.0), patient=patient, phase=phase)
    assert {r["unit"] for r in rows} == {"mm"}
    assert score_volume(pred, gt)[0].unit == "voxels"
    by_class = aggregate(rows, by=("class",))
    assert [r["class"] for r in by_class] == ["lv", "myo", "rv"]
    assert all(r["n"] == 4 and 0.5 < r["dice"] < 1.0 for r in by_class)
    assert len(aggregate(rows, by=("patient",))) == 2
    assert len(aggregate(rows, by=("phase", "class"))) == 6
    s = dice_summary(rows)
    assert set(s) == {"dice_rv", "dice_myo", "dice_lv", "dice_mean"}
    assert s["dice_mean"] == pytest.approx(np.mean([s["dice_rv"], s["dice_myo"], s["dice_lv"]]))
    with pytest.raises(ValueError, match="shape"):
        score_volume(pred[:2], gt)
