"""PNG plots of a local run: per round (sync), or against wall-clock time and version (async)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, imported on first use (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(rows: Sequence[Any], path: Path, *, mode: str, title: str = "") -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    if mode == "sync":
        rounds = [r.round for r in rows]
        left.plot(rounds, [r.test_accuracy for r in rows], marker="o", label="global model, test set")
        left.plot(
            rounds, [r.eval_accuracy_clients for r in rows], marker="s", ls="--", label="clients, local eval"
        )
        left.set(xlabel="round", ylabel="accuracy", title="accuracy")
        right.plot(rounds, [r.test_loss for r in rows], marker="o", label="global model, test set")
        right.plot(rounds, [r.train_loss for r in rows], marker="s", ls="--", label="clients, training")
        right.set(xlabel="round", ylabel="loss", title="loss")
        for ax in (left, right):
            ax.set_xticks(rounds)
    else:
        accuracy = [r.test_accuracy for r in rows]
        left.plot([r.elapsed_seconds for r in rows], accuracy, marker=".", label="global model, test set")
        left.set(xlabel="wall-clock seconds", ylabel="accuracy", title="accuracy over time")
        versions = [r.version for r in rows]
        right.plot(versions, accuracy, marker=".", label="global model, test set")
        right.set(xlabel="global version", ylabel="accuracy", title="accuracy and staleness per version")
        staleness = right.twinx()
        for name, style in (("staleness_p95", ":"), ("staleness_max", "--")):
            values = [getattr(r, name, None) for r in rows]
            staleness.plot(versions, values, ls=style, color="tab:red", lw=1, label=name.replace("_", " "))
        staleness.set_ylabel("staleness (versions)", color="tab:red")
        staleness.set_ylim(bottom=0)
        staleness.legend(loc="lower right", fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left" if ax is right and mode != "sync" else "best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
