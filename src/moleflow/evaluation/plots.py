"""Pictures a person wants to look at after a run: anomaly-map overlays, routing confusion, ROC, PR and PRO curves.

All figures are written as PNG with matplotlib's Agg backend (no display needed); :func:`write_figures`
writes the end-of-run set to the run directory and hands them to the loggers (W&B images).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from moleflow.data.datamodule import ContinualDataModule  # noqa: E402
from moleflow.data.images import to_pixels  # noqa: E402
from moleflow.evaluation.evaluate import TaskEvaluation  # noqa: E402
from moleflow.evaluation.metrics import AUPRO_FPR_LIMIT, pro_curve  # noqa: E402

log = logging.getLogger(__name__)


def denormalise(image: torch.Tensor) -> np.ndarray:
    """(3, S, S) ImageNet-normalised tensor -> (S, S, 3) float in [0, 1] for display."""
    return to_pixels(image).clamp(0, 1).permute(1, 2, 0).numpy()


def pick_samples(labels: torch.Tensor, count: int, seed: int = 0) -> list[int]:
    """Up to ``count`` indices, half anomalous and half normal where possible, seeded."""
    gen = np.random.default_rng(seed)
    normal = np.flatnonzero(labels.numpy() == 0)
    anomalous = np.flatnonzero(labels.numpy() == 1)
    n_anom = min(len(anomalous), max(count - len(normal), count // 2 + count % 2))
    n_norm = min(len(normal), count - n_anom)
    chosen = list(gen.choice(anomalous, n_anom, replace=False)) + list(gen.choice(normal, n_norm, replace=False))
    return sorted(int(i) for i in chosen)


def save_overlays(
    ev: TaskEvaluation,
    images: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None,
    indices: Sequence[int],
    task_names: Sequence[str],
    path: str | Path,
) -> Path:
    """One row per sampled test image: image, heat map over the image, ground-truth mask (if any).

    ``images`` (3, S, S) and ``masks`` (S, S) are the sampled test images, in the order of ``indices``;
    heat-map colours share one scale per figure (min..max of the shown maps) so rows are comparable.
    """
    cols = 3 if masks is not None else 2
    fig, axes = plt.subplots(len(indices), cols, figsize=(3 * cols, 3 * len(indices)), squeeze=False)
    maps = ev.routed_pixel_maps[list(indices)]
    vmin, vmax = float(maps.min()), float(maps.max())
    for row, (i, image) in enumerate(zip(indices, images, strict=True)):
        rgb = denormalise(image)
        label = "defective" if int(ev.labels[i]) else "normal"
        routed = task_names[int(ev.routed_tasks[i])]
        axes[row, 0].imshow(rgb)
        axes[row, 0].set_title(f"{ev.name} #{i}: {label}", fontsize=8)
        axes[row, 1].imshow(rgb)
        axes[row, 1].imshow(ev.routed_pixel_maps[i].numpy(), cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        axes[row, 1].set_title(f"score {float(ev.routed_image_scores[i]):.1f}, routed to {routed}", fontsize=8)
        if masks is not None:
            axes[row, 2].imshow(masks[row].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row, 2].set_title("ground truth", fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_confusion_matrix(
    confusion: np.ndarray,
    names: Sequence[str],
    path: str | Path,
    by_label: dict[str, np.ndarray] | None = None,
) -> Path:
    """Routing confusion matrix (rows: true task, columns: routed task) with counts in the cells.

    With ``by_label`` ({"normal": C, "defective": C}) the defect-free and the defective test images get a
    panel each next to the matrix of all images, each titled with its routing accuracy: a router that
    defects fool shows it there even when the overall matrix looks fine.
    """
    panels = [("all test images", np.asarray(confusion))]
    panels += [(f"{kind} images", np.asarray(c)) for kind, c in (by_label or {}).items()]
    size = max(4.0, 0.5 * len(names) + 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], panels, strict=True):
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("routed to")
        ax.set_ylabel("true task")
        for (r, c), value in np.ndenumerate(matrix):
            ax.text(c, r, str(value), ha="center", va="center", fontsize=7)
        total = matrix.sum()
        accuracy = f"{100 * np.trace(matrix) / total:.1f} %" if total else "n/a"
        ax.set_title(f"Routing, {title}: {accuracy}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _save_curves(
    lines: list[tuple[np.ndarray, np.ndarray, str]],
    path: str | Path,
    axes: tuple[str, str, str],
    legend_loc: str,
    chance: bool = False,
    fpr_limit: float | None = None,
) -> Path:
    """One figure of per-task curves (x, y, legend label); ``axes`` = (x label, y label, title)."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for x, y, label in lines:
        ax.plot(x, y, label=label)
    if chance:
        ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    if fpr_limit is not None:
        ax.axvline(fpr_limit, color="k", linestyle=":", linewidth=1)
        ax.set_xlim(0, 1)
    if not chance:
        ax.set_ylim(0, 1.02)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(axes[2])
    ax.legend(fontsize=7, loc=legend_loc)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _two_class(evaluations: Sequence[TaskEvaluation]) -> list[TaskEvaluation]:
    """The tasks whose scored images hold both classes (a curve needs both)."""
    return [ev for ev in evaluations if ev.labels.min() != ev.labels.max()]


def save_roc_curves(evaluations: Sequence[TaskEvaluation], path: str | Path) -> Path:
    """Image-level ROC curve of every task (routed scores), AUROC in the legend."""
    lines = []
    for ev in _two_class(evaluations):
        fpr, tpr, _ = roc_curve(ev.labels.numpy(), ev.routed_image_scores.numpy())
        lines.append((fpr, tpr, f"{ev.name} ({100 * ev.routed.image_auroc:.1f})"))
    axes = ("false positive rate", "true positive rate", "Image-level ROC per task (AUROC %)")
    return _save_curves(lines, path, axes, "lower right", chance=True)


def save_pr_curves(evaluations: Sequence[TaskEvaluation], path: str | Path) -> Path:
    """Image-level precision-recall curve of every task (routed scores), AP and F1-max in the legend."""
    lines = []
    for ev in _two_class(evaluations):
        precision, recall, _ = precision_recall_curve(ev.labels.numpy(), ev.routed_image_scores.numpy())
        label = f"{ev.name} (AP {100 * ev.routed.image_ap:.1f}, F1-max {100 * ev.routed.image_f1_max:.1f})"
        lines.append((recall, precision, label))
    return _save_curves(lines, path, ("recall", "precision", "Image-level precision-recall per task"), "lower left")


def save_pro_curves(evaluations: Sequence[TaskEvaluation], masks: dict[int, Any], path: str | Path) -> Path | None:
    """Per-region overlap (PRO) curve of every task with masks (routed maps), AUPRO at 30 % FPR in the legend;
    None when no task has masks."""
    lines = []
    for ev in evaluations:
        if ev.has_masks and masks.get(ev.task) is not None:
            curve = pro_curve(ev.routed_pixel_maps, masks[ev.task])
            if curve is not None:
                lines.append((curve[0], curve[1], f"{ev.name} (AUPRO@30% {100 * ev.routed.pixel_aupro:.1f})"))
    if not lines:
        return None
    axes = ("false positive rate (defect-free pixels)", "mean per-region overlap", "Pixel-level PRO curve per task")
    return _save_curves(lines, path, axes, "lower right", fpr_limit=AUPRO_FPR_LIMIT)


def write_figures(
    output_dir: Path,
    dm: ContinualDataModule,
    evaluations: list[TaskEvaluation],
    names: list[str],
    confusion: np.ndarray | None,
    overlays_per_task: int,
    loggers: list[Any],
    confusion_by_label: dict[str, np.ndarray] | None = None,
    test_masks: dict[int, Any] | None = None,
) -> dict[str, Any]:
    """Overlays per task, the routing confusion matrix, ROC and PR curves, and with ``test_masks`` (task -> (N, S, S)
    ground truth) the PRO curves; returns their paths (relative)."""
    fig_dir = output_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {"overlays": {}}
    for ev in evaluations:
        if overlays_per_task <= 0:
            break
        indices = pick_samples(ev.labels, overlays_per_task)
        dataset = dm.test_dataset(ev.task)
        samples = [dataset[i] for i in indices]
        images = [sample["image"] for sample in samples]
        masks = [sample["mask"][0] for sample in samples] if ev.has_masks else None
        path = save_overlays(ev, images, masks, indices, names, fig_dir / f"overlays_{ev.task:02d}_{ev.name}.png")
        written["overlays"][ev.name] = str(path.relative_to(output_dir))
    if confusion is not None:
        path = save_confusion_matrix(
            confusion, names[: len(confusion)], fig_dir / "routing_confusion.png", confusion_by_label
        )
        written["routing_confusion"] = str(path.relative_to(output_dir))
    path = save_roc_curves(evaluations, fig_dir / "roc_curves.png")
    written["roc_curves"] = str(path.relative_to(output_dir))
    written["pr_curves"] = str(save_pr_curves(evaluations, fig_dir / "pr_curves.png").relative_to(output_dir))
    pro = save_pro_curves(evaluations, test_masks or {}, fig_dir / "pro_curves.png")
    if pro is not None:
        written["pro_curves"] = str(pro.relative_to(output_dir))
    for lg in loggers:
        if hasattr(lg, "log_image"):
            try:
                files = [str(output_dir / p) for p in written["overlays"].values()]
                curves = ("routing_confusion", "roc_curves", "pr_curves", "pro_curves")
                files += [str(output_dir / written[k]) for k in curves if k in written]
                lg.log_image(key="figures", images=files)
            except Exception as err:  # noqa: BLE001 - figures must never fail a finished run
                log.warning("Could not log figures to %s: %s", type(lg).__name__, err)
    return written
