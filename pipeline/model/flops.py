"""Model FLOPs of CLIP-ViP from its architecture, and model FLOPs utilisation (MFU).

Counted as the standard for MFU (PaLM, Chowdhery et al. 2022, appendix B): the multiply-adds of
matrix products only (2 FLOPs each): linear layers, the patch-embedding convolution, the two
attention products (Q K^T and P V); layer norms, softmax, GELU and the loss's similarity matrices
are left out (the last costs 2 * G * P FLOPs per clip and pair of sources, under 0.01% at the
recipe's G = 1024). This is what `torch.utils.flop_counter.FlopCounterMode` counts, which the unit
test holds the formula to.

Forward FLOPs of one sequence of S tokens through one pre-LN block of width D, MLP width I:
    8 S D^2 (q, k, v, out projections) + 4 S D I (fc1, fc2) + 4 D * (attention score pairs)
with score pairs S^2 for dense attention, and for CLIP-ViP's proxy-guided attention (spec 1.3)
M S (M proxies attend to all S tokens) + T L (M + L) (each frame's L patches attend to the M
proxies and their own frame). A video of T frames has S = M + T L tokens, L = (image / patch)^2.
Text runs N = max_text_len tokens (padded rows cost the same) with full N^2 score pairs (SDPA
computes the masked pairs too). Training = forward + backward = 3x forward, except that the
patch embedding needs no gradient with respect to the pixels (2x its forward, not 3x).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPTextConfig, CLIPVisionConfig

# Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), TFLOP/s. Matched
# against torch.cuda.get_device_name() by substring, first hit wins (so the H100 PCIe entry
# precedes the generic H100 one).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM / HBM3
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


@dataclass(frozen=True, slots=True)
class ClipFlops:
    """FLOPs of one training clip, split by tower (forward + backward)."""

    video: float
    frame: float
    text: float

    @property
    def total(self) -> float:
        return self.video + self.frame + self.text


def _block_flops(tokens: int, score_pairs: int, width: int, mlp_width: int) -> float:
    return 8.0 * tokens * width * width + 4.0 * tokens * width * mlp_width + 4.0 * width * score_pairs


def vision_forward_flops(vision: CLIPVisionConfig, num_frames: int, num_proxies: int, projection_dim: int,
                         attention: str = "sparse") -> tuple[float, float]:
    """(total, patch embedding) forward FLOPs of one video through the ViP vision tower.

    Args:
        vision: the tower's shapes.
        num_frames: T.
        num_proxies: M = 1 + add_cls_num (1 for plain CLIP).
        projection_dim: P of `visual_projection` (applied to the pooled token only).
        attention: "sparse" (proxy-guided, what training runs) or "dense" (S x S pairs).
    """
    D, I = vision.hidden_size, vision.intermediate_size  # noqa: E741
    L = (vision.image_size // vision.patch_size) ** 2
    M, T = num_proxies, num_frames
    S = M + T * L
    pairs = S * S if attention == "dense" else M * S + T * L * (M + L)
    patch = 2.0 * T * L * 3 * vision.patch_size**2 * D
    return patch + vision.num_hidden_layers * _block_flops(S, pairs, D, I) + 2.0 * D * projection_dim, patch


def text_forward_flops(text: CLIPTextConfig, num_tokens: int, projection_dim: int) -> float:
    """Forward FLOPs of one text of `num_tokens` (padded length) through the CLIP text tower."""
    D, I, N = text.hidden_size, text.intermediate_size, num_tokens  # noqa: E741
    return text.num_hidden_layers * _block_flops(N, N * N, D, I) + 2.0 * D * projection_dim


def train_flops_per_clip(config, num_frames: int, num_tokens: int,
                         sources: tuple[str, ...] = ("video", "subtitle", "frame", "caption")) -> ClipFlops:
    """Forward + backward FLOPs of one post-pretraining clip.

    Args:
        config: a `CLIPViPConfig` (its vision/text configs, proxies, pooling, attention).
        num_frames: T frames of the video branch.
        num_tokens: padded text length (model.max_text_len).
        sources: branches the loss uses (`OmnisourceLoss.sources`, a task's `sources`): "video",
            "frame" (the middle frame as a 1-frame video) and one text pass each for "subtitle",
            "caption" and "text" (fine-tuning's one caption).

    Returns:
        Per-tower FLOPs; `.total` is what MFU divides by.
    """
    vision, P = config.vision_config, config.projection_dim
    mean_pool = getattr(config, "video_pooling", "proxy") == "mean"
    M = 1 + int(getattr(config, "add_cls_num", 0))
    attention = getattr(config, "attention", "sparse")

    def train(frames: int) -> float:
        if mean_pool:  # CLIP4Clip: every frame alone through plain CLIP (spec 1.6)
            fwd, patch = vision_forward_flops(vision, 1, 1, P, attention)
            fwd, patch = fwd * frames, patch * frames
        else:
            fwd, patch = vision_forward_flops(vision, frames, M, P, attention)
        return 3.0 * fwd - patch

    text = 3.0 * text_forward_flops(config.text_config, num_tokens, P)
    return ClipFlops(video=train(num_frames) if "video" in sources else 0.0,
                     frame=train(1) if "frame" in sources else 0.0,
                     text=text * sum(s in sources for s in ("subtitle", "caption", "text")))


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Dense bf16 peak of a GPU from its name (`torch.cuda.get_device_name()`), or `override`.

    Returns:
        TFLOP/s, or None when the name is not in `PEAK_BF16_TFLOPS` and no override is given
        (MFU is then not reported rather than guessed).
    """
    if override:
        return float(override)
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def mfu(flops_per_clip: float, clips_per_s: float, peak_tflops_per_device: float | None,
        num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' combined peak."""
    if not peak_tflops_per_device:
        return None
    return flops_per_clip * clips_per_s / (peak_tflops_per_device * 1e12 * num_devices)
