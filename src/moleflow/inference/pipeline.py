"""The routed pipeline, images -> verdicts, shared by the Python detector and the exported model.

Normalised images (B, 3, S, S) -> backbone patch features -> router (nearest task prototype) -> the
flow of each image's routed task (the model's own layers, :meth:`MoLEFlowModel.nll_routed`) -> per-image
scores and pixel maps (:mod:`moleflow.evaluation.scoring`) -> verdicts against per-task thresholds.

:class:`~moleflow.inference.detector.MoLEFlowDetector` runs it eagerly; :mod:`moleflow.inference.export`
traces (TorchScript) or ``torch.export``s the very same module with ``every_task=True``, which visits
every task with tensor ops only (no branch on the routed values). There is no second, export-only copy
of the flow: whatever layer the model is made of is exported as it is.
"""

from __future__ import annotations

from torch import Tensor, nn

from moleflow.evaluation.scoring import score_maps
from moleflow.models.feature_extractor import FeatureExtractor
from moleflow.models.moleflow import MoLEFlowModel
from moleflow.thresholds.fitting import normalized_score, outside_own_route

OUTPUTS = {
    "task": "(B,) int64: routed (nearest) task index; names in metadata task_names",
    "routing_distance": "(B,) float64: squared Mahalanobis distance to the routed task",
    "distances": "(B, T) float64: squared Mahalanobis distance to every task",
    "score": "(B,) float32: image score, mean of the top-k patch NLLs of the routed task",
    "threshold": "(B,) float64: the routed task's score threshold (inf when not calibrated)",
    "is_unknown": "(B,) bool: distance to the routed task above that task's own route threshold",
    "is_defective": "(B,) bool: score > threshold and not unknown",
    "normalized_score": "(B,) float64 in [0, 1]: 0.5 at the routed task's threshold, 0 at or below the median score "
    "of its defect-free calibration images, linear, clipped (NaN without a threshold or a stored median)",
    "pixel_threshold": "(B,) float64: the routed task's pixel threshold (inf when none)",
    "defect_mask": "(B, S, S) bool: anomaly_map > the routed task's pixel threshold (all false when unknown)",
    "nll_map": "(B, H, W) float32: per-patch NLL (non-finite values replaced per image)",
    "anomaly_map": "(B, S, S) float32: NLL map upsampled to the input size and Gaussian-smoothed",
    "nonfinite": "(B,) int64: patch values that were NaN/inf and replaced",
}


class RoutedPipeline(nn.Module):
    """Images (B, 3, S, S) and per-task thresholds (T,) float64 -> the tensors listed in ``OUTPUTS``.

    Args:
        extractor: the frozen backbone + patch embedding.
        model: the trained flow with its router prototypes (shared with the caller, not copied).
        image_size: side S of the input images (and of the pixel maps).
        score_top_k: image score = mean of the top-k patch NLLs.
        pixel_sigma: Gaussian smoothing of the pixel maps.
        every_task: visit every task with tensor ops only (for tracing / export); same values.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        model: MoLEFlowModel,
        image_size: int,
        score_top_k: int,
        pixel_sigma: float,
        every_task: bool = False,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.model = model
        self.image_size = int(image_size)
        self.score_top_k = int(score_top_k)
        self.pixel_sigma = float(pixel_sigma)
        self.every_task = every_task

    def forward(
        self,
        images: Tensor,
        score_thresholds: Tensor,
        route_thresholds: Tensor,
        score_medians: Tensor,
        pixel_thresholds: Tensor,
    ) -> dict[str, Tensor]:
        """Images (B, 3, S, S) and per-task (T,) float64 score thresholds, route thresholds, median scores and
        pixel thresholds -> the tensors of ``OUTPUTS``."""
        features = self.extractor(images)
        # the router's own choice, not the argmin of its distances: float32 runtimes round away the one-ulp
        # raise with which the robust router's vote encodes its choice in the float64 distances
        dists, tasks = self.model.router.decide(self.model.router.summarize(features), self.model.num_tasks)
        best = dists.gather(1, tasks[:, None]).squeeze(1)
        nll = self.model.nll_routed(features, tasks, every_task=self.every_task)
        clean, scores, pixels, replaced = score_maps(nll, self.score_top_k, self.image_size, self.pixel_sigma)
        unknown = outside_own_route(dists, route_thresholds, tasks)
        threshold = score_thresholds.index_select(0, tasks)
        pixel_threshold = pixel_thresholds.index_select(0, tasks)
        mask = (pixels.to(pixel_threshold.dtype) > pixel_threshold[:, None, None]) & ~unknown[:, None, None]
        return {
            "task": tasks,
            "routing_distance": best,
            "distances": dists,
            "score": scores,
            "threshold": threshold,
            "is_unknown": unknown,
            "is_defective": (scores.to(threshold.dtype) > threshold) & ~unknown,
            "normalized_score": normalized_score(scores, threshold, score_medians.index_select(0, tasks)),
            "pixel_threshold": pixel_threshold,
            "defect_mask": mask,
            "nll_map": clean,
            "anomaly_map": pixels,
            "nonfinite": replaced,
        }
