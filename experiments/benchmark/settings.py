"""Benchmark settings: what is measured at which sizes, and the MVTec AD facts the estimate uses."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from moleflow.config.flow import MoLEFlowConfig

# MVTec AD (data-set facts, alphabetical task order): normal training images and test images per category.
MVTEC_TRAIN = {
    "bottle": 209, "cable": 224, "capsule": 219, "carpet": 280, "grid": 264, "hazelnut": 391, "leather": 245,
    "metal_nut": 220, "pill": 267, "screw": 320, "tile": 230, "toothbrush": 60, "transistor": 213, "wood": 247,
    "zipper": 240,
}  # fmt: skip
MVTEC_TEST = {
    "bottle": 83, "cable": 150, "capsule": 132, "carpet": 117, "grid": 78, "hazelnut": 110, "leather": 124,
    "metal_nut": 115, "pill": 167, "screw": 160, "tile": 117, "toothbrush": 42, "transistor": 100, "wood": 79,
    "zipper": 151,
}  # fmt: skip
MAIN_EPOCHS = 60
MAIN_BATCH = 16
SCORE_TOP_K = 3
PIXEL_SIGMA = 4.0
# Documented memory bound of the pixel metrics: 2.5 GB extra for the 87 M pixels of a 15-task MVTec evaluation.
PIXEL_BOUND_BYTES = 2.5e9
PIXEL_BOUND_PIXELS = sum(MVTEC_TEST.values()) * 224 * 224
MERGE_RTOL, MERGE_ATOL = 1e-5, 1e-4  # merged vs unmerged NLL: |a - b| <= atol + rtol * |b| (torch.allclose)


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class BenchSettings:
    """What to measure at which sizes. ``full_settings`` is the representative configuration."""

    mode: str = "full"  # full | quick | smoke (tests)
    device: str = "cpu"
    threads: int | None = None
    batch: int = 16
    image_size: int = 224
    embed_dim: int = MoLEFlowConfig.embed_dim  # MAIN's shapes: the flow settings' own defaults
    hidden: int = MoLEFlowConfig.hidden
    ncl: int = MoLEFlowConfig.ncl
    lora_rank: int = MoLEFlowConfig.lora_rank
    scale_context_kernel: int = MoLEFlowConfig.scale_context_kernel
    spatial_context_kernel: int = MoLEFlowConfig.spatial_context_kernel
    tasks: int = 15
    warmup: int = 1
    repeats: int = 3
    mm_repeats: int = 5
    square: int = 2048  # large square matmul side (8192 on a GPU)
    backbone: str = "wide_resnet50_2"
    decode_source_size: int = 1024  # PNG side before load_rgb resizes it (MVTec AD images are 700-1024 px)
    mixed_tasks: int = 4  # distinct tasks in the routed mixed batch
    stream_batches: int = 4  # batches in the pipelined inference stream (decode overlapped with the model)
    e2e_backbone: str = "wide_resnet50_2"
    e2e_epochs: int = 3
    e2e_train_images: int = 16
    e2e_test_good: int = 4
    e2e_test_defect: int = 2  # per defect type (the generator draws 2 types)
    e2e_flow_overrides: list[str] = field(default_factory=list)  # empty: MAIN flow shapes
    e2e_rounds: int = 1  # runs per pipeline, in ABBA order; the fastest is reported
    e2e_warmup: bool = True  # a tiny run first, so one-off import/initialisation costs hit neither timed run
    pixel_images: int = sum(MVTEC_TEST.values())  # test images of the pixel-metric run (at image_size)
    keep_freed_memory: bool = True  # as runtime.keep_freed_memory (the training default); False: --system-allocator

    @property
    def grid(self) -> int:
        """Patch grid side: layer2 of the ResNet backbones has stride 8."""
        return -(-self.image_size // 8)

    @property
    def representative(self) -> bool:
        return self.mode == "full"

    def flow_config(self) -> MoLEFlowConfig:
        return MoLEFlowConfig(
            embed_dim=self.embed_dim,
            hidden=self.hidden,
            ncl=self.ncl,
            lora_rank=self.lora_rank,
            scale_context_kernel=self.scale_context_kernel,
            spatial_context_kernel=self.spatial_context_kernel,
        )


def full_settings(device: str = "cpu", threads: int | None = None) -> BenchSettings:
    """MAIN shapes: batch 16 at 224 px, D = 768, NCL = 6, rank 64, 15 tasks, WideResNet-50-2."""
    return BenchSettings(mode="full", device=device, threads=threads, square=8192 if device == "cuda" else 2048)


def quick_settings(device: str = "cpu", threads: int | None = None) -> BenchSettings:
    """Reduced sizes for development (< 1 min on 2 cores): the figures are NOT representative."""
    return replace(
        full_settings(device, threads),
        mode="quick",
        batch=2,
        tasks=2,
        repeats=1,
        mm_repeats=3,
        square=1024,
        decode_source_size=256,
        mixed_tasks=2,
        e2e_backbone="resnet10t",
        e2e_epochs=2,
        e2e_train_images=4,
        e2e_test_good=1,
        e2e_test_defect=1,
        e2e_flow_overrides=["ncl=2", "lora_rank=8", "model.flow.embed_dim=64", "model.flow.hidden=64"],
        pixel_images=100,  # 5.0 M pixels
    )


def smoke_settings() -> BenchSettings:
    """Tiny sizes for the test suite: every section runs in seconds; the figures mean nothing."""
    return replace(
        quick_settings("cpu"),
        mode="smoke",
        image_size=64,
        embed_dim=32,
        hidden=32,
        ncl=2,
        lora_rank=4,
        repeats=1,
        mm_repeats=2,
        square=256,
        backbone="resnet10t",
        decode_source_size=64,
        e2e_flow_overrides=["ncl=2", "lora_rank=4", "model.flow.embed_dim=32", "model.flow.hidden=32"],
        e2e_warmup=False,
        e2e_rounds=1,
        pixel_images=20,
    )
