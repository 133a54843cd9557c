"""The same test images under two methods, side by side: image, ground truth, MoLE-Flow's map, PatchCore's map.

Both methods keep the maps of the same few images of each task (:func:`moleflow.evaluation.score_records.
example_indices` picks them from the labels alone); each map is drawn on its own colour scale (the raw
scores of the two methods are on different scales), so the figure shows *where* each method looks.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moleflow.data.datamodule import ContinualDataModule  # noqa: E402
from moleflow.data.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from moleflow.evaluation.score_records import ScoreRecord  # noqa: E402


def _picture(dataset, index: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - a SampleDataset
    """(image (S, S, 3) in [0, 1], mask (S, S)) of one scored image, as the methods saw it."""
    item = dataset[index]
    mean = np.asarray(IMAGENET_MEAN).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD).reshape(3, 1, 1)
    image = np.clip(item["image"].numpy() * std + mean, 0, 1).transpose(1, 2, 0)
    return image, item["mask"][0].numpy()


def write_side_by_side(
    dm: ContinualDataModule,
    ours: dict[str, ScoreRecord],
    baseline: dict[str, ScoreRecord],
    folder: Path,
    labels: tuple[str, str] = ("MoLE-Flow", "PatchCore"),
) -> list[Path]:
    """``folder/<task>.png`` for every task with example maps from both methods; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for t, name in enumerate(dm.task_names):
        a, b = ours.get(name), baseline.get(name)
        if a is None or b is None or a.example_maps is None or b.example_maps is None:
            continue
        if not np.array_equal(a.example_indices, b.example_indices):
            continue  # not the same images: nothing to compare side by side
        dataset = dm.test_dataset(t)
        rows = len(a.example_indices)
        fig, axes = plt.subplots(rows, 4, figsize=(10, 2.5 * rows), squeeze=False)
        for r, index in enumerate(a.example_indices.tolist()):
            image, mask = _picture(dataset, index)
            kind = "defective" if a.labels[index] else "normal"
            panels = [(image, f"{kind} #{index}"), (mask, "ground truth")]
            panels += [(a.example_maps[r], labels[0]), (b.example_maps[r], labels[1])]
            for c, (panel, title) in enumerate(panels):
                ax = axes[r][c]
                ax.imshow(panel, cmap=None if panel.ndim == 3 else ("gray" if c == 1 else "jet"))
                ax.set_title(title, fontsize=8)
                ax.axis("off")
        fig.suptitle(f"{name}: the same images, each map on its own colour scale", fontsize=9)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
