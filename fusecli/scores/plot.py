"""`tune --plot FILE.png`: a picture of what tune chose (matplotlib, the `plot` extra).

Two models: the metric along the weight of the first, the choice, each model alone (the ends)
and the uniform average marked. More models: the metric per round of greedy selection (or the
chosen method's score as a line), and the final weights as bars; each model alone and the
uniform average as reference lines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusecli.errors import FusecliError, InvalidRequest

if TYPE_CHECKING:
    from fusecli.scores.tuning import TuneResult

INSTALL = "pip install 'fusecli[plot]'"


def check_plot_request(path: str | os.PathLike[str], *, inputs: list[Any], force: bool) -> None:
    """Refuse a bad --plot before any work: not a .png, over an input, matplotlib missing."""
    from fusecli.output import check_output_path

    if Path(path).suffix.lower() != ".png":
        raise InvalidRequest(f"--plot writes a .png file. Received: plot={str(path)!r}")
    check_output_path(path, inputs=inputs, force=force)
    _pyplot()


def plot_tune(result: TuneResult, path: str | os.PathLike[str], *, force: bool = False) -> None:
    from fusecli.output import atomic_output

    plt = _pyplot()
    metric = result.metric
    short = [Path(n).stem for n in result.names]
    if result.curve:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ws, values = zip(*result.curve, strict=True)
        ax.plot(ws, values, color="C0", label=f"{metric} of w*{short[0]} + (1-w)*{short[1]}")
        ax.scatter([1, 0], [result.singles[0].score, result.singles[1].score], color="C1",
                   zorder=3, label="each model alone")  # fmt: skip
        ax.scatter([0.5], [result.uniform], color="C2", zorder=3, label="uniform average")
        if result.weights is not None:
            ax.axvline(result.weights[0], color="C3", linestyle="--",
                       label=f"chosen ({result.method}): w = {result.weights[0]:.3g}")  # fmt: skip
        ax.set_xlabel(f"weight of {short[0]} (the rest on {short[1]})")
        ax.set_ylabel(f"{metric} on {result.rows} validation rows")
        ax.legend(fontsize=8)
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        if result.history:
            rounds = range(1, len(result.history) + 1)
            left.plot(rounds, result.history, color="C0", marker=".", label="greedy ensemble")
            best = result.choice.get("best_round")
            if best:
                left.axvline(best, color="C3", linestyle="--", label=f"kept: round {best}")
            left.set_xlabel("round of selection")
        else:
            left.axhline(result.score, color="C0", label=f"chosen ({result.method})")
            left.set_xticks([])
        best_single = max(result.singles, key=lambda c: c.score)
        worst = min(c.score for c in result.singles)
        left.axhline(best_single.score, color="C1", linestyle=":", label="best model alone")
        left.axhline(worst, color="C1", linestyle=":", alpha=0.4, label="worst model alone")
        left.axhline(result.uniform, color="C2", linestyle="-.", label="uniform average")
        left.set_ylabel(f"{metric} on {result.rows} validation rows")
        left.legend(fontsize=8)
        if result.weights is not None:
            right.bar(range(len(short)), result.weights, color="C0")
            right.set_ylabel("weight")
            right.set_title(f"weights chosen by {result.method}")
        else:
            import numpy as np

            coef = np.abs(np.asarray(result.choice["stack"]["coef"]))
            per_model = coef.reshape(len(short), -1).sum(axis=1)
            right.bar(range(len(short)), per_model / per_model.sum(), color="C0")
            right.set_ylabel("share of |coefficients|")
            right.set_title("stacking head: each model's share")
        right.set_xticks(range(len(short)), short, rotation=60, ha="right", fontsize=7)
    fig.suptitle(_title(result), fontsize=10)
    fig.tight_layout()
    with atomic_output(path, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _title(result: TuneResult) -> str:
    cv = f", {result.cv:.4f} cross-validated" if result.cv is not None else ""
    return f"{result.method}: {result.metric} {result.score:.4f} on validation{cv}"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FusecliError(f"--plot needs matplotlib: {INSTALL}") from None
    return plt
