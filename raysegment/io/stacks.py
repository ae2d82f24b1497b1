"""Short-axis stacks stored as a series per slice (many cine protocols acquire each short-axis slice
in its own breath-hold and store it as its own series): which single-slice series of a study make
one stack. Works on the planes ``io.dicom`` read from the headers; no pixels.

Imports numpy and pydicom only; not ``io.dicom`` (which calls it).
"""

from __future__ import annotations

import numpy as np

MIN_SLICES = 3  # single-slice series that make a stack: two parallel ones are as likely two views


LEVEL_TOLERANCE_MM = 0.05  # positions of one slice differ by less (rounding, re-written headers); slices by mm


def position_levels(dist, tol: float = LEVEL_TOLERANCE_MM) -> tuple[np.ndarray, np.ndarray]:
    """Positions along the slice normal (mm) → (each one's level index, the levels' mean positions in
    mm, ascending): a position within ``tol`` of the next lower one is on its level. Rounding to a grid
    split positions that straddle a grid line (10.004 and 10.006 mm) into two slices."""
    dist = np.asarray(dist, dtype=float)
    order = np.argsort(dist, kind="stable")
    labels = np.empty(len(dist), dtype=int)
    level = 0
    for i, k in enumerate(order):
        if i and dist[k] - dist[order[i - 1]] > tol:
            level += 1
        labels[k] = level
    return labels, np.array([dist[labels == n].mean() for n in range(level + 1)]) if len(dist) else np.zeros(0)


def stack_uid(study_uid: str, frame_of_reference: str, orientation) -> str:
    """A stack's UID, derived from its study, frame of reference and orientation (not its members):
    a slice series added later is new content of the same stack, not a new stack."""
    from pydicom.uid import generate_uid

    iop = ",".join(f"{v:.2f}" for v in orientation)
    return generate_uid(entropy_srcs=["raysegment stack", study_uid, frame_of_reference, iop])


def single_slice(planes: list) -> tuple | None:
    """(orientation, position along the normal in mm, series number) of a series whose images all
    lie in one plane; None for any other."""
    if not planes or any(p is None for p in planes):
        return None
    iop = np.array(planes[0][1])
    if any(not np.allclose(p[1], iop, atol=1e-3) for p in planes[1:]):
        return None
    normal = np.cross(iop[:3], iop[3:])
    dist = [float(np.dot(p[2], normal)) for p in planes]
    if max(dist) - min(dist) > 0.05:
        return None
    return iop, float(np.median(dist)), planes[0][5]


def stack_groups(series: dict[str, tuple[str, list]]) -> list[tuple[str, list[str]]]:
    """``series``: UID → (study UID, its images' planes: [frame of reference, orientation, position,
    rows, columns, series number]) → [(stack UID, member series UIDs from base to apex along the
    normal)]: the single-slice series of one study, frame of reference, image size and orientation
    (within 0.001), at ``MIN_SLICES`` or more positions. Of two at one position (``position_levels``:
    a slice acquired again) the higher series number is taken; the other stays a series of its own."""
    pools: dict[tuple, list] = {}
    for uid, (study, planes) in series.items():
        found = single_slice(planes)
        if found is not None:
            frame_of_reference, rows, cols = planes[0][0], planes[0][3], planes[0][4]
            pools.setdefault((study, frame_of_reference, rows, cols), []).append((uid, *found))
    stacks = []
    for (study, frame_of_reference, _, _), candidates in pools.items():
        groups: list[list] = []
        for c in sorted(candidates, key=lambda c: c[0]):
            home = next((g for g in groups if np.allclose(g[0][1], c[1], atol=1e-3)), None)
            groups.append([c]) if home is None else home.append(c)
        for group in groups:
            levels, _ = position_levels([c[2] for c in group])
            at: dict[int, tuple] = {}
            for level, c in sorted(zip(levels, group), key=lambda lc: (lc[1][3], lc[1][0])):
                at[level] = c  # a later series number wins its position
            if len(at) >= MIN_SLICES:
                members = [c[0] for _, c in sorted(at.items())]
                stacks.append((stack_uid(study, frame_of_reference, group[0][1]), members))
    return stacks
