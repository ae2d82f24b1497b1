"""How close `--in-plane auto`'s calls are: per volume of a split, statistics of the models' softmax
on the middle 3 slices as stored minus the same with rows reversed (what auto compares; positive =
as stored chosen, right for ACDC's files). Prints, per statistic, the wrong calls and the min and
median margin; "top_heart" is the one the Predictor uses.
    python jobs/in-plane-margins.py MODEL SHARDS [SPLIT]   e.g. shipped:densenet121 ~/raysegment-runs/shards val"""
import sys

import numpy as np

from raysegment.data.dataset import load_volumes
from raysegment.inference.predictor import Predictor
from raysegment.io.studies import turn_in_plane


def statistics(probs: np.ndarray) -> dict[str, float]:
    top, heart = probs.max(0), probs[1:].sum(0) > 0.5
    entropy = -(probs * np.log(np.clip(probs, 1e-8, 1))).sum(0)
    if not heart.any():
        return {"top_heart": 0.0, "neg_entropy_heart": -9.0, "sure_heart": 0.0, "top_all": float(top.mean())}
    return {"top_heart": float(top[heart].mean()), "neg_entropy_heart": -float(entropy[heart].mean()),
            "sure_heart": float((top[heart] > 0.9).mean()), "top_all": float(top.mean())}


def main(model: str, shards: str, split: str = "val") -> None:
    predictor = Predictor.load(model)
    margins: dict[str, list[float]] = {}
    for v in load_volumes(shards, split):
        mid = v.image.shape[0] // 2
        part = v.image[max(mid - 1, 0): mid + 2]
        stored, rows_reversed = (statistics(predictor.probabilities(turn_in_plane(part, how), spacing=v.spacing,
                                                                    in_plane="as-stored"))
                                 for how in Predictor.AUTO_IN_PLANE)
        for k in stored:
            margins.setdefault(k, []).append(stored[k] - rows_reversed[k])
    for k, m in margins.items():
        m = np.array(m)
        print(f"{model} {split} {k:18s} wrong {(m <= 0).sum()}/{len(m)}  min {m.min():+.4f}  median {np.median(m):+.4f}"
              f"  min/median {m.min() / np.median(m):+.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
