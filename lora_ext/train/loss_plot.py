"""The loss curve of a run as a PNG: what the tab shows while it trains and the demo writes."""
from __future__ import annotations


def loss_plot(losses: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    k = max(1, len(losses) // 10)
    ax.plot(losses, lw=0.8, alpha=0.5 if k > 1 else 1.0, label="loss per step")
    if k > 1:       # a moving average over a tenth of the run shows the trend through the noise
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(smooth, lw=1.6, label=f"average of {k} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
