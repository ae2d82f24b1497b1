"""Patient splits stratified by diagnosis group: the one seeded shuffle behind the train/val split
of ``prepare`` and the cross-validation folds of the diagnosis. Imports nothing of raysegment."""

from __future__ import annotations

import random


def shuffled_groups(groups: dict[str, str], seed: int) -> list[list[str]]:
    """Patients by group (groups in sorted order), each group's patients in a seeded random order."""
    rng = random.Random(seed)
    by_group: dict[str, list[str]] = {}
    for patient, group in sorted(groups.items()):
        by_group.setdefault(group, []).append(patient)
    for group in sorted(by_group):
        rng.shuffle(by_group[group])
    return [by_group[g] for g in sorted(by_group)]


def stratified_val(groups: dict[str, str], fraction: float, seed: int) -> set[str]:
    """round(N × ``fraction``) patients for validation, dealt round-robin over the groups (so the
    val set is stratified even when groups are small)."""
    members = shuffled_groups(groups, seed)
    order = [m[rank] for rank in range(max(map(len, members), default=0)) for m in members if rank < len(m)]
    return set(order[: int(round(len(order) * fraction))])


def stratified_folds(groups: dict[str, str], folds: int, seed: int = 0) -> dict[str, int]:
    """Patient → fold (0..folds-1): each group's patients dealt round-robin, the next group starting
    where the last one stopped, so folds differ in size by at most one, and so does each group."""
    out: dict[str, int] = {}
    offset = 0
    for members in shuffled_groups(groups, seed):
        for i, patient in enumerate(members):
            out[patient] = (i + offset) % folds
        offset += len(members)
    return out
