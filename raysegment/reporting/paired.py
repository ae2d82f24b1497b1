"""Paired-comparison reports (``python -m raysegment.report compare``, ``report evaluate --ci``):
markdown tables and scatters of ``analysis.paired``'s results — two models' Dice per volume, or their
clinical indices' absolute errors per patient — with 95 % CIs. May import ``analysis`` and
``reporting.report``, nothing above."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raysegment.reporting.report import pyplot, save_figure


def _signed(x: float, digits: int = 3) -> str:
    """``+0.003``-style (``digits`` decimals), with no ``-0.000``: a difference that rounds to 0 is
    written ``+0.000``."""
    return f"{round(x, digits) + 0.0:+.{digits}f}"


def _ci_title(name: str, row: dict, digits: int) -> str:
    """'NAME: B − A +d [+lo, +hi]' of a paired row."""
    return (f"{name}: B − A {_signed(row['diff'], digits)} "
            f"[{_signed(row['ci_low'], digits)}, {_signed(row['ci_high'], digits)}]")


def _diagonal_panel(ax, low: float, high: float, title: str, xlabel: str, ylabel: str) -> None:
    """A square panel from ``low`` to ``high`` with its diagonal (A = B), title and axis labels."""
    ax.plot([low, high], [low, high], color="0.5", lw=0.8)
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(xlabel[:48], fontsize=8)
    ax.set_ylabel(ylabel[:48], fontsize=8)


def _class_name(c: str) -> str:
    """'RV', 'MYO', 'LV' for the classes, 'mean' for their mean."""
    return c if c == "mean" else c.upper()


def ci_line(split: str, ci: dict[str, tuple[float, float, float]], resamples: int) -> str:
    """One line: a split's mean Dice per class with its 95 % CI (``analysis.paired.dice_ci``)."""
    cells = ", ".join(f"{_class_name(c)} {m:.3f} [{lo:.3f}, {hi:.3f}]" for c, (m, lo, hi) in ci.items())
    return f"{split}: Dice with 95 % CI, patients resampled ({resamples} draws): {cells}"


def paired_table(result: dict, label_a: str = "A", label_b: str = "B") -> str:
    """Markdown of ``analysis.paired.paired_dice``: per class A, B, B − A with its 95 % CI, volumes won."""
    lines = ["| class | A | B | B − A | 95 % CI of B − A | volumes B / A better |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {_class_name(r['class'])} | {r['a']:.3f} | {r['b']:.3f} | {_signed(r['diff'])} "
                     f"| {_signed(r['ci_low'])} … {_signed(r['ci_high'])} | {r['b_better']} / {r['a_better']} |")
    lines.append(f"\nA: {label_a}. B: {label_b}. 3-D Dice per volume, {result['volumes']} volumes of "
                 f"{result['patients']} patients; the CI resamples patients ({result['resamples']} draws, "
                 f"seed {result['seed']}): one that holds 0 means these patients do not tell A and B apart.")
    return "\n".join(lines)


def paired_level_table(rows: list[dict], label_a: str = "A", label_b: str = "B") -> str:
    """Markdown of ``analysis.paired.paired_levels``: per level and class A, B, B − A with its 95 % CI,
    and each side's slices missed / drawn extra."""
    lines = ["| level | class | volumes | A | B | B − A | 95 % CI of B − A | slices missed A / B | extra A / B |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['level']} | {_class_name(r['class'])} | {r['volumes']} | {r['a']:.3f} | {r['b']:.3f} "
                     f"| {_signed(r['diff'])} | {_signed(r['ci_low'])} … {_signed(r['ci_high'])} "
                     f"| {r['missed_a']} / {r['missed_b']} | {r['extra_a']} / {r['extra_b']} |")
    lines.append(f"\nA: {label_a}. B: {label_b}. Dice on each level's slices (the reference's slices from base to apex "
                 "in three equal runs) per volume where the reference or either side draws the structure there (a side "
                 "drawing none there, as the reference, scores 1); the CI resamples patients.")
    return "\n".join(lines)


def paired_plot(result: dict, out: Path, label_a: str = "A", label_b: str = "B") -> Path:
    """One panel per class of ``analysis.paired.paired_dice``'s volumes: each one's Dice under A (x)
    against B (y); above the diagonal B wins."""
    plt = pyplot()
    volumes = result["per_volume"]
    es = np.array([v["phase"] == "ES" for v in volumes])
    fig, axes = plt.subplots(1, len(result["rows"]), figsize=(3.2 * len(result["rows"]), 3.4), squeeze=False)
    for ax, row in zip(axes[0], result["rows"]):
        x, y = (np.array([v[side][row["class"]] for v in volumes]) for side in ("a", "b"))
        ax.scatter(x[~es], y[~es], s=14, color="#4363d8", label="ED")
        ax.scatter(x[es], y[es], s=14, color="#e6194b", label="ES")
        _diagonal_panel(ax, min(x.min(), y.min()) - 0.01, 1.0, _ci_title(row["class"], row, 3),
                        f"Dice, A ({label_a})", f"Dice, B ({label_b})")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, out)


def paired_errors_table(result: dict, label_a: str = "A", label_b: str = "B") -> str:
    """Markdown of ``analysis.paired.paired_errors``: per clinical index the MAE of A and B, B − A with
    its 95 % CI, both biases, patients each side measures closer."""
    lines = ["| index | n | MAE A | MAE B | B − A | 95 % CI of B − A | bias A | bias B | patients B / A closer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if not r["n"]:  # e.g. an EF where one side's masks hold no ED volume
            lines.append(f"| {r['index']} | 0 |" + " — |" * 7)
            continue
        lines.append(f"| {r['index']} | {r['n']} | {r['mae_a']:.2f} | {r['mae_b']:.2f} | {_signed(r['diff'], 2)} "
                     f"| {_signed(r['ci_low'], 2)} … {_signed(r['ci_high'], 2)} | {_signed(r['bias_a'], 2)} "
                     f"| {_signed(r['bias_b'], 2)} | {r['b_closer']} / {r['a_closer']} |")
    lines.append(f"\nA: {label_a}. B: {label_b}. Absolute error against the reference masks' value, per patient "
                 f"(units in the index's name), {result['patients']} patients; B − A < 0: B is closer. The CI "
                 f"resamples patients ({result['resamples']} draws, seed {result['seed']}): one that holds 0 "
                 "means these patients do not tell A and B apart.")
    return "\n".join(lines)


def paired_errors_plot(result: dict, out: Path, label_a: str = "A", label_b: str = "B", per_row: int = 4) -> Path:
    """One panel per clinical index of ``analysis.paired.paired_errors``: each patient's absolute error
    under A (x) against B (y), coloured by group; below the diagonal B is closer."""
    plt = pyplot()
    patients = result["per_patient"]
    groups = sorted({p["group"] for p in patients})
    colours = dict(zip(groups, plt.cm.tab10.colors))
    rows = -(-len(result["rows"]) // per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(3.4 * per_row, 3.4 * rows), squeeze=False)
    for ax, row in zip(axes.flat, result["rows"]):
        k = row["index"]
        err = {side: np.array([abs(p[side][k] - p["ref"][k]) for p in patients]) for side in ("a", "b")}
        for g in groups:
            sel = np.array([p["group"] == g for p in patients])
            ax.scatter(err["a"][sel], err["b"][sel], s=14, color=colours[g], label=g)
        top = float(np.nanmax([*err["a"], *err["b"], 1e-6])) * 1.05
        _diagonal_panel(ax, 0.0, top, _ci_title(k, row, 2), f"|error|, A ({label_a})", f"|error|, B ({label_b})")
    for ax in list(axes.flat)[len(result["rows"]):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, out)
