"""The picture of a finished search: every trial's val Dice (mean of RV, MYO, LV) per epoch — a trial
ASHA stopped is a short line — and, per searched parameter that varied, the best val Dice each
trial reached against its value. PNG, matplotlib, headless.

May import ``io``; not ``inference``, ``registry``, ``training`` or ``cli``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from raysegment.reporting.report import pyplot, save_figure

LOG_SCALE = ("lr",)  # parameters searched log-uniformly: drawn on a log axis


def varied(trials: list[dict], params: Sequence[str]) -> list[str]:
    """The ``params`` that take more than one value among ``trials`` (what a panel can show)."""
    return [p for p in params if len({t[p] for t in trials if t.get(p) is not None}) > 1]


def search_figure(trials: list[dict], curves: dict[str, list[tuple[int, float]]], params: Sequence[str],
                  out: Path) -> Path:
    """Write the search's figure to ``out``. ``trials``: the trial table (``trial_id``, the searched
    values, ``dice_mean``: the trial's best), best first; ``curves``: trial id → (epoch from 1, val
    Dice mean) pairs; ``params``: the searched names. The best trial is drawn in black."""
    from matplotlib.ticker import MaxNLocator, NullFormatter

    plt = pyplot()
    shown = varied(trials, params)
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(4.6 + 2.6 * len(shown), 3.4), squeeze=False,
                             gridspec_kw={"width_ratios": [1.8] + [1] * len(shown)})
    ax = axes[0][0]
    best = trials[0]["trial_id"] if trials else None
    for trial_id, points in sorted(curves.items(), key=lambda kv: kv[0] == best):  # the best drawn last, on top
        if points:
            epochs, dice = zip(*sorted(points))
            top = trial_id == best
            ax.plot(epochs, dice, color="black" if top else "#4363d8", alpha=1.0 if top else 0.45,
                    linewidth=1.8 if top else 1.0, marker="o" if len(epochs) < 12 else None, markersize=3,
                    label=f"best: {trial_id}" if top else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val Dice (mean)")
    ax.set_title(f"{len(curves)} trials", fontsize=9)
    ax.grid(alpha=0.3)
    if best in curves:
        ax.legend(fontsize=8, loc="lower right")
    for ax, name in zip(axes[0][1:], shown):
        xs = [(t[name], t["dice_mean"], t["trial_id"] == best) for t in trials if t.get(name) is not None]
        ax.scatter([x for x, _, b in xs if not b], [y for _, y, b in xs if not b], s=18, color="#4363d8")
        ax.scatter([x for x, _, b in xs if b], [y for _, y, b in xs if b], s=30, color="black")
        if name in LOG_SCALE:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of a short decade overlap
            values = [x for x, _, _ in xs]
            ticks = np.geomspace(min(values), max(values), 3) if min(values) < max(values) else values[:1]
            ax.set_xticks(ticks, [f"{t:.1e}" for t in ticks], fontsize=8)  # its range, not whole decades alone
        elif all(isinstance(x, int) for x, _, _ in xs):  # a choice (decoder_width): its values as ticks
            ax.set_xticks(sorted({x for x, _, _ in xs}))
        ax.set_xlabel(name)
        if ax is axes[0][1]:
            ax.set_ylabel("best val Dice (mean)")
        ax.grid(alpha=0.3)
    fig.suptitle("search: val Dice per trial (black: the best)", fontsize=9)
    return save_figure(fig, out, rect=(0, 0, 1, 0.95))
