"""How close an exported model must come to the Python model, and the check of one against the other.

A format's :class:`Tolerance` (``TOLERANCES``) bounds scores, maps and routing distances; tied routes and
near-threshold verdicts may differ (``ROUTING_RULE``, ``VERDICT_RULE``). :func:`parity_report` compares the
outputs of both on the same images; :mod:`moleflow.inference.export` runs it on every file it writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

SCORE_RTOL = 1e-4  # relative tolerance of exported vs Python image scores and maps (float32 reassociation)
SCORE_ATOL = 1e-3  # absolute tolerance in nats, for values near zero
ROUTING_RULE = (
    "routed tasks identical, except an image whose two nearest routing distances (Python model) are within the "
    "distance tolerance of each other; its other outputs are then not compared"
)
VERDICT_RULE = (
    "is_defective and is_unknown identical, except an image whose score is within the score tolerance of its "
    "threshold or one of whose distances is within the distance tolerance of that task's route threshold; "
    "defect_mask identical except at pixels whose anomaly_map is within the score tolerance of the pixel threshold"
)


@dataclass(frozen=True)
class Tolerance:
    """How close an exported model must come to the Python model: ``|got - ref| <= atol + rtol * |ref|``.

    Scores, maps and thresholds use the score pair (nats); routing distances the distance pair. Tied routes and
    near-threshold verdicts may differ (``ROUTING_RULE``, ``VERDICT_RULE``).
    """

    score_rtol: float
    score_atol: float
    distance_rtol: float
    distance_atol: float

    def close(self, got: Tensor, ref: Tensor, kind: str) -> Tensor:
        """Elementwise: ``got`` within this tolerance of ``ref`` (``kind``: "score" or "distance"); inf matches inf,
        NaN matches NaN (a task without a stored median has no normalised score in either)."""
        rtol, atol = (self.score_rtol, self.score_atol) if kind == "score" else (self.distance_rtol, self.distance_atol)
        return torch.isclose(got.to(torch.float64), ref.to(torch.float64), rtol=rtol, atol=atol, equal_nan=True)

    def describe(self) -> dict[str, Any]:
        """The tolerance with its rules, as stored in the metadata and named in errors."""
        return {**asdict(self), "routed_tasks": ROUTING_RULE, "verdicts": VERDICT_RULE}


# float64 kept (TorchScript, torch.export, ONNX Runtime): float32 reassociation only
_FLOAT64_KEPT = Tolerance(score_rtol=SCORE_RTOL, score_atol=SCORE_ATOL, distance_rtol=1e-4, distance_atol=1e-3)
TOLERANCES = {
    "torchscript": _FLOAT64_KEPT,
    "pt2": _FLOAT64_KEPT,
    "onnx": _FLOAT64_KEPT,
    # OpenVINO computes the float64 router (and thresholds) in float32: measured ~1e-3 relative on distances
    # of a near-singular precision matrix, ~3e-4 on NLL maps
    "openvino": Tolerance(score_rtol=2e-3, score_atol=1e-2, distance_rtol=1e-2, distance_atol=1e-2),
}


def parity_report(
    got: Mapping[str, Tensor], ref: Mapping[str, Tensor], tolerance: Tolerance, route_thresholds: Tensor
) -> dict[str, Any]:
    """Exported outputs ``got`` against the Python model's ``ref`` on the same images, under ``tolerance``.

    Returns ``problems`` (empty: within tolerance), ``errors`` ({output: {max_abs, max_rel}} over the images
    compared), ``tied`` (images routed differently at a near-tie, not compared further) and ``near_threshold``
    (images whose verdicts were not compared).
    """
    got = {k: torch.as_tensor(v).detach().cpu() for k, v in got.items()}
    ref = {k: v.detach().cpu() for k, v in ref.items()}
    problems: list[str] = []
    nearest = ref["distances"].topk(min(2, ref["distances"].shape[1]), dim=1, largest=False).values
    near_tie = tolerance.close(nearest[:, 0], nearest[:, -1], "distance") & (nearest.shape[1] > 1)
    routed_apart = got["task"].to(torch.int64) != ref["task"]
    tied = routed_apart & near_tie
    if (routed_apart & ~near_tie).any():
        n = int((routed_apart & ~near_tie).sum())
        problems.append(
            f"it routes {n} image(s) to other tasks than Python does ({got['task'].tolist()} vs "
            f"{ref['task'].tolist()}) whose two nearest distances are not within the distance tolerance"
        )
    same = ~routed_apart
    errors: dict[str, dict[str, float]] = {}
    kinds = {"routing_distance": "distance", "distances": "distance", "score": "score", "threshold": "score"}
    kinds |= {"nll_map": "score", "anomaly_map": "score", "normalized_score": "score", "pixel_threshold": "score"}
    for key, kind in kinds.items():
        rows = slice(None) if key == "distances" else same
        g, r = got[key][rows].to(torch.float64), ref[key][rows].to(torch.float64)
        finite = r.isfinite() & g.isfinite()
        diff = (g - r).abs().where(finite, torch.zeros_like(r))
        errors[key] = {
            "max_abs": float(diff.max()) if diff.numel() else 0.0,
            "max_rel": float((diff / r.abs().clamp(min=1e-12)).max()) if diff.numel() else 0.0,
        }
        bad = ~tolerance.close(g, r, kind)
        if bad.any():
            images = int(bad.reshape(bad.shape[0], -1).any(dim=1).sum())
            one_sided = int((bad & ~finite).sum())  # inf or NaN in one of them, another value in the other
            problems.append(
                f"its {key} differs by up to {errors[key]['max_abs']:.3g} (relative {errors[key]['max_rel']:.3g}) "
                f"on {images} image(s), beyond the {kind} tolerance"
                + (f" ({one_sided} value(s) not finite in one of them only)" if one_sided else "")
            )
    if not torch.equal(got["nonfinite"][same].to(torch.int64), ref["nonfinite"][same]):
        problems.append("it replaces a different number of non-finite patch values")
    score_near = tolerance.close(ref["score"], ref["threshold"], "score")
    route_near = tolerance.close(
        ref["distances"], route_thresholds.cpu()[None, :].expand_as(ref["distances"]), "distance"
    )
    near = score_near | route_near.any(dim=1)
    for key in ("is_defective", "is_unknown"):
        differs = (got[key].to(torch.bool) != ref[key]) & same & ~near
        if differs.any():
            problems.append(f"its {key} verdict differs on {int(differs.sum())} image(s) not near a threshold")
    # the defect mask may differ only at pixels within the score tolerance of the pixel threshold
    pixel_near = tolerance.close(
        ref["anomaly_map"], ref["pixel_threshold"][:, None, None].expand_as(ref["anomaly_map"]), "score"
    )
    mask_differs = (got["defect_mask"].to(torch.bool) != ref["defect_mask"]) & ~pixel_near
    mask_differs &= (same & ~route_near.any(dim=1))[:, None, None]
    if mask_differs.any():
        problems.append(f"its defect_mask differs at {int(mask_differs.sum())} pixel(s) not near the pixel threshold")
    return {
        "problems": problems,
        "errors": errors,
        "images": int(ref["task"].shape[0]),
        "tied": tied.nonzero().flatten().tolist(),
        "near_threshold": near.nonzero().flatten().tolist(),
    }
