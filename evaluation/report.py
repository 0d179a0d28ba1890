"""A sweep's (or a list of runs') report: Markdown table, metric plots, sample grid, scatter."""
from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_METRICS = ("silhouette_iou", "silhouette_iou_max_view", "diversity", "clip_t")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(results: list[dict], out_dir: Path, swept_key: str | None = None,
                 values: list[str] | None = None, report_to: str = "none") -> Path:
    """results: evaluate_run outputs, one per run (in sweep order). Returns report.md."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = values or [r["run"] for r in results]
    metrics = list(dict.fromkeys(k for r in results for k in r["summary"]))
    figures = {}

    # Each metric against the swept value.
    cols = 4
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    numeric = _as_numbers(labels)
    for ax, m in zip(axes.flat, metrics):
        ys = [r["summary"].get(m, np.nan) for r in results]
        ax.plot(numeric if numeric else range(len(labels)), ys, "o-")
        if numeric and min(numeric) > 0 and max(numeric) / min(numeric) > 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        ax.set_title(m, fontsize=8)
        ax.set_xlabel(swept_key or "run", fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    figures["metrics"] = out_dir / "metrics_vs_value.png"
    fig.savefig(figures["metrics"], dpi=100)
    plt.close(fig)

    # The seeds' figure: rows = swept values, columns = prompts.
    keys = list(results[0]["samples"])
    fig, axes = plt.subplots(len(results), len(keys), figsize=(2 * len(keys), 2 * len(results)), squeeze=False)
    for i, r in enumerate(results):
        for j, k in enumerate(keys):
            axes[i, j].imshow(r["samples"][k].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(k, fontsize=8)
            if j == 0:
                axes[i, j].set_ylabel(labels[i], fontsize=8)
    fig.tight_layout()
    figures["samples"] = out_dir / "samples_grid.png"
    fig.savefig(figures["samples"], dpi=100)
    plt.close(fig)

    # Fidelity against editability (CLIP-T when available, else diversity, and the report says so).
    edit_key = "clip_t" if all("clip_t" in r["summary"] for r in results) else "diversity"
    fig, ax = plt.subplots(figsize=(4, 3.5))
    # One fidelity measure for every run: *s's attention IoU when all runs have it.
    fid_key = "attention/shape/iou" if all("attention/shape/iou" in r["summary"] for r in results) else "silhouette_iou"
    xs = [r["summary"][fid_key] for r in results]
    ys = [r["summary"][edit_key] for r in results]
    ax.scatter(xs, ys)
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), fontsize=7)
    ax.set_xlabel(f"fidelity ({fid_key})")
    ax.set_ylabel(f"editability ({edit_key})")
    fig.tight_layout()
    figures["scatter"] = out_dir / "fidelity_vs_editability.png"
    fig.savefig(figures["scatter"], dpi=100)
    plt.close(fig)

    backbone = results[0]["backbone"]
    lines = [f"# Report{f': sweep of `{swept_key}`' if swept_key else ''}", "",
             f"Backbone: `{backbone}`. Runs: {', '.join(r['run'] for r in results)}.", ""]
    from guided_concepts.backbone.tiny import TINY_LAYOUTS
    if backbone in TINY_LAYOUTS:
        lines += [f"**The `{backbone}` model's weights are random.** Its generated-image metrics "
                  f"({', '.join(m for m in IMAGE_METRICS)}, and the token consistency/distinctness scores) only show that "
                  "the machinery runs; the attention metrics (`attention/*`, mask IoU and mass at t=100 on the "
                  "reference views) and the pose-probe error are meaningful. Run the same command with "
                  "`--model` set to real Stable Diffusion weights for image metrics that mean something.", ""]
    for note in dict.fromkeys(n for r in results for n in r["notes"]):
        lines += [f"- {note}"]
    lines += ["", "| " + (swept_key or "run") + " | " + " | ".join(metrics) + " |",
              "|" + "---|" * (len(metrics) + 1)]
    for label, r in zip(labels, results):
        lines.append(f"| {label} | " + " | ".join(_fmt(r["summary"].get(m, "")) for m in metrics) + " |")
    lines += ["", f"![metrics]({figures['metrics'].name})", "", f"![samples]({figures['samples'].name})", "",
              f"![scatter]({figures['scatter'].name})", "",
              "Per object and prompt: `rows.csv`; everything: `results.json`."]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    if report_to == "wandb":
        _to_wandb(results, labels, metrics, figures, out_dir, swept_key)
    return report


def _as_numbers(labels):
    try:
        return [float(v) for v in labels]
    except (TypeError, ValueError):
        return None


def _to_wandb(results, labels, metrics, figures, out_dir, swept_key):
    import wandb
    run = wandb.init(project="guided-concepts", name=f"report-{out_dir.name}", dir=str(out_dir), job_type="report")
    table = wandb.Table(columns=[swept_key or "run"] + metrics,
                        data=[[label] + [r["summary"].get(m) for m in metrics] for label, r in zip(labels, results)])
    run.log({"results": table, **{name: wandb.Image(str(path)) for name, path in figures.items()}})
    run.finish()
