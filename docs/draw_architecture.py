"""Draw docs/architecture.png: the deployed fedstream stack and its message flow.

.venv/bin/python docs/draw_architecture.py [OUTPUT.png]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUTPUT = Path(__file__).resolve().parent / "architecture.png"

COLOURS = {
    "client": "#dbeafe",
    "messaging": "#fce7f3",
    "storage": "#dcfce7",
    "compute": "#fef3c7",
    "orchestration": "#ede9fe",
    "ops": "#f1f5f9",
}
EDGE = "#334155"


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float

    @property
    def left(self) -> tuple[float, float]:
        return (self.x, self.y + self.h / 2)

    @property
    def right(self) -> tuple[float, float]:
        return (self.x + self.w, self.y + self.h / 2)

    @property
    def top(self) -> tuple[float, float]:
        return (self.x + self.w / 2, self.y + self.h)

    @property
    def bottom(self) -> tuple[float, float]:
        return (self.x + self.w / 2, self.y)

    def at(self, fx: float, fy: float) -> tuple[float, float]:
        return (self.x + fx * self.w, self.y + fy * self.h)


def box(ax, x, y, w, h, title, body="", kind="compute", dashed=False) -> Box:
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.12",
            facecolor=COLOURS[kind],
            edgecolor=EDGE,
            linewidth=1.4,
            linestyle="--" if dashed else "-",
        )
    )
    ax.text(
        x + w / 2,
        y + h - 0.22,
        title,
        ha="center",
        va="top",
        fontsize=11.5,
        fontweight="bold",
        color="#0f172a",
    )
    if body:
        ax.text(
            x + w / 2,
            y + h - 0.62,
            body,
            ha="center",
            va="top",
            fontsize=9.2,
            color="#1e293b",
            linespacing=1.35,
        )
    return Box(x, y, w, h)


def arrow(ax, start, end, label="", colour=EDGE, dashed=False, rad=0.0, label_at=0.5, offset=(0.0, 0.12)):
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle="-|>",
            mutation_scale=16,
            linewidth=1.6,
            color=colour,
            linestyle="--" if dashed else "-",
            connectionstyle=f"arc3,rad={rad}",
            shrinkA=2,
            shrinkB=2,
        )
    )
    if label:
        x = start[0] + (end[0] - start[0]) * label_at + offset[0]
        y = start[1] + (end[1] - start[1]) * label_at + offset[1]
        ax.text(
            x,
            y,
            label,
            ha="center",
            va="bottom",
            fontsize=8.8,
            color=colour,
            bbox={"boxstyle": "round,pad=0.18", "facecolor": "white", "edgecolor": "none", "alpha": 0.9},
        )


def draw(output: Path = OUTPUT) -> Path:
    fig, ax = plt.subplots(figsize=(18, 11), dpi=110)
    ax.set_xlim(0, 18)
    ax.set_ylim(0, 11)
    ax.axis("off")
    ax.text(
        9,
        10.8,
        "fedstream on AWS: one CDK stack, the mode chosen at deploy time (cdk deploy -c mode=sync|async)",
        ha="center",
        va="top",
        fontsize=15,
        fontweight="bold",
    )
    ax.text(
        9,
        10.25,
        "solid: sync mode     dashed: async mode     numbers: one sync round",
        ha="center",
        va="top",
        fontsize=10.5,
        color="#475569",
    )

    # Column 1: clients, each in its own place with its own IAM role.
    site_a = box(
        ax,
        0.3,
        7.6,
        3.0,
        1.9,
        "site-a",
        "same account\nIAM role: own queue, global\nmodels, own prefix and key",
        "client",
    )
    site_b = box(
        ax, 0.3, 5.3, 3.0, 1.9, "site-b", "another account\nassumes its role with\nan external id", "client"
    )
    site_c = box(
        ax,
        0.3,
        3.0,
        3.0,
        1.9,
        "site-c",
        "on premises\nIAM Roles Anywhere\n(certificate CN = client id)",
        "client",
    )
    ax.text(
        1.8,
        2.55,
        "data never leaves a client;\nonly weights move",
        ha="center",
        va="top",
        fontsize=9.5,
        style="italic",
        color="#475569",
    )

    # Column 2: what clients touch.
    queues = box(
        ax,
        4.4,
        7.4,
        3.3,
        2.1,
        "SQS: a queue per client",
        "KMS, TLS only, dead-letter queue\nonly the model-events topic\nmay send to it",
        "messaging",
    )
    bucket = box(
        ax,
        4.4,
        4.3,
        3.3,
        2.5,
        "S3: model bucket",
        "KMS, versioned, TLS only\nruns/{run}/global/{version}\n"
        "runs/{run}/updates/{client}/\nruns/{run}/state/",
        "storage",
    )
    updates = box(
        ax,
        4.4,
        1.3,
        3.3,
        2.4,
        "DynamoDB: updates",
        "PK client_id, SK update_id\nstream of new images\nPITR, KMS, on-demand",
        "storage",
    )

    # Column 3: the server's functions and the topic.
    topic = box(
        ax, 9.2, 7.6, 2.9, 1.9, "SNS: model events", 'KMS, raw delivery\n"model ready", "done"', "messaging"
    )
    aggregate = box(
        ax, 9.2, 4.5, 2.9, 1.9, "λ aggregate", "count reports per round,\naggregate when complete", "compute"
    )
    async_update = box(
        ax,
        9.2,
        1.5,
        2.9,
        2.0,
        "λ async_update",
        "apply each update on arrival\n(staleness), one batch per\nshard; notifies via SNS",
        "compute",
        dashed=True,
    )

    # Column 4: orchestration and run state.
    machine = box(
        ax,
        13.8,
        7.6,
        3.2,
        1.9,
        "Step Functions",
        "rounds with task tokens,\nlogging and X-Ray on",
        "orchestration",
    )
    finalize_q = box(ax, 13.8, 6.0, 3.2, 1.1, "SQS: finalize", "a round's deadline passed", "messaging")
    finalize = box(
        ax,
        13.8,
        4.3,
        3.2,
        1.3,
        "λ finalize",
        "close with the quorum or fail;\ncalls the state machine back",
        "compute",
    )
    runs = box(
        ax,
        13.8,
        1.3,
        3.2,
        2.4,
        "DynamoDB: runs",
        "PK run_id, SK sk\nglobal version pointer,\nrounds, reports",
        "storage",
    )

    # One sync round.
    arrow(ax, machine.left, topic.right, "1 publish\n+ task token", offset=(0.0, 0.12))
    arrow(ax, topic.left, queues.right, "2 fan-out")
    arrow(ax, queues.left, site_a.right, "3 long-poll")
    arrow(ax, queues.at(0.0, 0.2), site_b.at(1.0, 0.8))
    arrow(ax, queues.at(0.0, 0.05), site_c.at(1.0, 0.85))
    arrow(ax, site_c.at(1.0, 0.62), bucket.at(0.0, 0.08), "")
    ax.text(
        3.85,
        3.78,
        "4 GET global\n5 PUT update",
        ha="center",
        va="center",
        fontsize=8.8,
        color=EDGE,
        bbox={"boxstyle": "round,pad=0.18", "facecolor": "white", "edgecolor": "none", "alpha": 0.9},
    )
    arrow(ax, site_c.at(1.0, 0.2), updates.at(0.0, 0.75), "")
    ax.text(
        3.85,
        2.72,
        "6 PutItem,\nown client_id",
        ha="center",
        va="center",
        fontsize=8.8,
        color=EDGE,
        bbox={"boxstyle": "round,pad=0.18", "facecolor": "white", "edgecolor": "none", "alpha": 0.9},
    )
    arrow(ax, updates.at(1.0, 0.85), aggregate.at(0.0, 0.2), "7 stream", label_at=0.35, offset=(-0.1, 0.15))
    arrow(
        ax,
        aggregate.at(0.0, 0.8),
        bucket.at(1.0, 0.75),
        "8 new global\nversion",
        label_at=0.5,
        offset=(0.0, 0.05),
    )
    arrow(
        ax,
        aggregate.at(1.0, 0.85),
        machine.at(0.0, 0.15),
        "9 SendTaskSuccess",
        label_at=0.5,
        offset=(-0.35, 0.05),
    )
    arrow(ax, aggregate.at(1.0, 0.3), runs.at(0.0, 0.85), "round state", label_at=0.5, offset=(0.0, 0.05))
    arrow(ax, machine.at(0.5, 0.0), finalize_q.top, "10 deadline", label_at=0.4, offset=(0.75, -0.1))
    arrow(ax, finalize_q.bottom, finalize.top)
    arrow(ax, machine.at(0.95, 0.5), runs.at(0.95, 0.5), "", rad=-0.35)
    ax.text(17.75, 4.2, "run state", rotation=90, ha="center", va="center", fontsize=9, color=EDGE)

    # Async mode.
    arrow(
        ax,
        updates.at(1.0, 0.35),
        async_update.at(0.0, 0.4),
        "stream",
        dashed=True,
        label_at=0.5,
        offset=(0, 0.05),
    )
    arrow(
        ax,
        async_update.at(1.0, 0.45),
        runs.at(0.0, 0.3),
        "flip the version\n(conditional)",
        dashed=True,
        label_at=0.5,
        offset=(0, 0.05),
    )
    arrow(ax, async_update.at(0.2, 1.0), bucket.at(1.0, 0.15), "", dashed=True)

    # Operations strip.
    box(ax, 0.3, 0.05, 16.7, 0.95, "", "", "ops")
    ax.text(
        8.65,
        0.52,
        "one KMS key (rotated) encrypts the bucket, tables, topics, queues and logs   |   "
        "dead-letter queues: clients, finalize, stream failures (on-failure destination)\n"
        "CloudWatch dashboard, namespace fedstream: rounds, round duration, clients, staleness, "
        "rejections by reason, epsilon, DLQ depth   |   alarms: DLQ not empty, run failed, "
        "no update for N minutes",
        ha="center",
        va="center",
        fontsize=9.4,
        color="#0f172a",
        linespacing=1.5,
    )
    fig.savefig(output, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return output


if __name__ == "__main__":
    print(draw(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT))
