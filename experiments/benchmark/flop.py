"""FLOP and parameter counts computed from the model's shapes (what the measured times are divided into)."""

from __future__ import annotations

from moleflow.config.flow import MoLEFlowConfig


# ------------------------------------------------------------------------------------------------- 3. flow
def subnet_linears(cfg: MoLEFlowConfig) -> list[tuple[int, int]]:
    """(in, out) of one coupling subnet's task-expert linears (docs/method.md 3.4)."""
    c1 = cfg.embed_dim // 2
    c2 = cfg.embed_dim - c1
    h = cfg.hidden
    if cfg.scale_context_kernel > 0:
        return [(2 * c1, h), (h, c2), (c1, h), (h, c2)]  # s1 on [u1, ctx], s2, t1, t2
    return [(c1, h), (h, 2 * c2)]


def flow_flop_per_patch(cfg: MoLEFlowConfig, merged: bool) -> dict[str, float]:
    """Forward FLOP of the flow per patch, computed from the shapes (multiply-add = 2 FLOP).

    Per coupling block (C1 = D // 2 conditioning channels, hidden width H):
      subnet linears, 2 * in * out each: s1 (2 C1 -> H), s2 (H -> C2), t1 (C1 -> H), t2 (H -> C2)
        (without scale context: l1 (C1 -> H), l2 (H -> 2 C2));
      LoRA experts when unmerged: + 2 * r * (in + out) per linear (A x, then B (A x));
        merged (W + (alpha / r) B A): nothing extra;
      scale-context depthwise conv: 2 * k * k * C1 (k = scale_context_kernel);
      the coupling itself (tanh, exp, multiply-add, permutation, log-det sum): O(D), neglected.
    Once per patch: spatial context mixer (depthwise conv) 2 * k_s * k_s * D; the adapter, positional
    code and NLL (O(D) each) are neglected.
    The training step's count is :func:`train_step_flop`.
    """
    linears = subnet_linears(cfg)
    base = sum(2 * i * o for i, o in linears)
    lora = sum(2 * cfg.lora_rank * (i + o) for i, o in linears) if cfg.expert_mode == "lora" and not merged else 0
    ctx = 2 * cfg.scale_context_kernel**2 * (cfg.embed_dim // 2) if cfg.scale_context_kernel > 0 else 0
    mixer = 2 * cfg.spatial_context_kernel**2 * cfg.embed_dim if cfg.spatial_context_kernel > 0 else 0
    block = base + lora + ctx
    return {
        "subnet_linears": float(cfg.ncl * base),
        "lora": float(cfg.ncl * lora),
        "scale_context_conv": float(cfg.ncl * ctx),
        "mixer": float(mixer),
        "total": float(cfg.ncl * block + mixer),
    }


def train_step_flop(cfg: MoLEFlowConfig, patches: int) -> dict[str, float]:
    """FLOP of one task-0 training step of the flow as the code runs it, computed from the shapes.

    Backward = 2 x forward (input and weight gradients: in task 0 every linear and conv trains), so a
    step is 3 x the forward. While the base trains, a LoRA expert is folded into it before the matmul
    (``TaskExpertLinear``: F.linear(x, W + (alpha / r) B A, b + b_t)), so the forward is the merged
    one, plus per expert linear and step 2 * r * in * out for B A and 4 * r * in * out for the
    gradients of B and A from W's gradient. The AdamP update (O(parameters)) is left out.
    ``unfused_formula`` is what the method's formula costs term by term (3 x the unmerged forward),
    for comparison only.
    """
    merged = flow_flop_per_patch(cfg, merged=True)["total"]
    fold = 0.0
    if cfg.expert_mode == "lora":
        fold = cfg.ncl * sum(6 * cfg.lora_rank * i * o for i, o in subnet_linears(cfg))
    return {
        "total": 3 * merged * patches + fold,
        "fold_experts": fold,
        "unfused_formula": 3 * flow_flop_per_patch(cfg, merged=False)["total"] * patches,
    }


def expected_parameter_counts(cfg: MoLEFlowConfig, tasks: int) -> dict[str, int]:
    """Parameter counts computed from the shapes (docs/method.md 9), to check parameter_counts() against."""
    linears = subnet_linears(cfg)
    c1 = cfg.embed_dim // 2
    k = cfg.scale_context_kernel
    subnet_base = sum(i * o + o for i, o in linears)
    ctx = (k * k * c1 + c1 + 1) if k > 0 else 0  # depthwise weights, bias, alpha logit
    ks = cfg.spatial_context_kernel
    mixer = (ks * ks * cfg.embed_dim + cfg.embed_dim + 1) if ks > 0 else 0
    shared = cfg.ncl * (subnet_base + ctx) + mixer
    expert = sum(cfg.lora_rank * (i + o) + o for i, o in linears) if cfg.expert_mode == "lora" else 0
    per_task = cfg.ncl * expert + (2 * cfg.embed_dim if cfg.adapter == "whitening" else 0)
    return {"shared": shared, "per_task": per_task, "total": shared + tasks * per_task}
