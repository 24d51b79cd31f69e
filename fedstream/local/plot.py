"""PNG plots of a local run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_rounds(rows: Sequence[Any], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in rows]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    acc_ax.plot(rounds, [r.test_accuracy for r in rows], marker="o", label="global model, test set")
    acc_ax.plot(
        rounds, [r.eval_accuracy_clients for r in rows], marker="s", ls="--", label="clients, local eval"
    )
    acc_ax.set(xlabel="round", ylabel="accuracy", title="accuracy")
    acc_ax.legend()
    loss_ax.plot(rounds, [r.test_loss for r in rows], marker="o", label="global model, test set")
    loss_ax.plot(rounds, [r.train_loss for r in rows], marker="s", ls="--", label="clients, training")
    loss_ax.set(xlabel="round", ylabel="loss", title="loss")
    loss_ax.legend()
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.set_xticks(rounds)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
