"""Proxy-guided attention benchmark: two-branch SDPA (ours) vs dense S x S masked SDPA.

Run:  cd /work/main && .venv/bin/python bench/attention.py [--batch 1] [--repeats 5] [--threads 2]

ViT-B/16 shapes, as in post-pretraining: T=12 frames, L=196 patches, M=4 proxies (S=2356),
D=768, 12 heads, fp32 on CPU, random weights. Both paths run side by side in this one process
on the same module (`CLIPViPAttention.attention_mode` flipped), same input, same weights:

  attention   one `CLIPViPAttention` (q/k/v projections, attention, out_proj), forward+backward
  layer       one `CLIPViPEncoderLayer` (LN, attention, MLP), forward+backward

Time: median wall time of `--repeats` forward+backward passes after one warm-up.
Memory: peak bytes of tensors allocated during one forward+backward, counted exactly with a
TorchDispatchMode that adds each new tensor storage produced by an aten op (forward and
backward, incl. autograd-saved tensors, gradients and the dense mask; views of an op's inputs
are not new) and subtracts it when the storage is freed. Inputs and weights that exist before
the pass are not counted; scratch space private to a fused kernel (e.g. the per-thread blocks
of CPU flash attention) is not seen.
The dense path is given the same additive mask the model builds (built inside the pass).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import weakref
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from transformers import CLIPVisionConfig  # noqa: E402

from pipeline.model.clip_vip import (  # noqa: E402
    CLIPViPEncoderLayer,
    additive_mask,
    build_vip_attention_mask,
)

M, T, L, D, HEADS = 4, 12, 196, 768, 12


class PeakTensorBytes(TorchDispatchMode):
    """Live/peak bytes of tensor storages created while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views, detach and in-place ops return an input's storage: not a new allocation.
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = id(storage)
                if key in self._tracked or key in inputs or storage.nbytes() == 0:
                    continue
                # torch preserves one Python object per storage, so this fires when the storage dies.
                self._tracked.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def make_pass(layer: CLIPViPEncoderLayer, x_BSD: torch.Tensor, what: str, path: str,
              num_proxies: int = M, num_frames: int = T) -> Callable[[], None]:
    """One forward+backward of `what` ("core", "attention", "layer") on `path`, on x's device and dtype."""
    attn = layer.self_attn
    A, E = attn.num_heads, attn.head_dim
    B, S, _ = x_BSD.shape
    num_patches = (S - num_proxies) // num_frames
    qkv = [torch.randn(B, S, A, E, generator=torch.Generator().manual_seed(i)).to(x_BSD) for i in range(3)]

    def run() -> None:
        attn.attention_mode = "sparse" if path == "sparse" else "dense"
        backend = SDPBackend.MATH if path == "dense-math" else None
        mask = None
        if path != "sparse":  # as CLIPViPEncoder does: built once per forward
            allowed = build_vip_attention_mask(num_proxies, num_frames, num_patches, x_BSD.device)
            mask = additive_mask(allowed, x_BSD.dtype)
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            if what == "core":
                inputs = [t.detach().requires_grad_(True) for t in qkv]
                y = attn.attend(*inputs, num_proxies, num_frames, mask)
            else:
                x = x_BSD.detach().requires_grad_(True)
                block = attn if what == "attention" else layer
                y = block(x, num_proxies, num_frames, mask)
            y.backward(torch.ones_like(y))
        layer.zero_grad(set_to_none=True)

    return run


def measure(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple[float, int]]:
    """Median time (runs interleaved, so load from other jobs hits every path alike) and peak bytes."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, run in runs.items():
        with PeakTensorBytes() as mem:
            run()
        results[name] = (statistics.median(times[name]), mem.peak)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=D,
        intermediate_size=4 * D,
        num_attention_heads=HEADS,
        num_hidden_layers=12,
        image_size=224,
        patch_size=16,
    )
    layer = CLIPViPEncoderLayer(config, "sparse")
    S = M + T * L
    x_BSD = torch.randn(args.batch, S, D)
    scores_dense = S * S
    scores_sparse = T * L * (M + L) + M * S
    print(
        f"B/16 shapes: B={args.batch} T={T} L={L} M={M} S={S} D={D} heads={HEADS}, fp32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats}"
    )
    ratio = scores_dense / scores_sparse
    print(f"attention scores per head: dense {scores_dense:,} vs two-branch {scores_sparse:,} ({ratio:.1f}x)")
    with torch.no_grad():
        outs = {}
        for mode in ("sparse", "dense"):
            layer.self_attn.attention_mode = mode
            outs[mode] = layer.self_attn(x_BSD, M, T)
    print(f"max |sparse - dense| attention output: {(outs['sparse'] - outs['dense']).abs().max().item():.2e}")
    print("paths: sparse = ours (two SDPA calls); dense = S x S additive mask, SDPA picks its fused CPU kernel;")
    print("       dense-math = same mask, SDPA math backend (materialises B x heads x S x S scores,")
    print("       as eager attention or any masked implementation that builds the score matrix)")

    print(f"\n{'what':<10} {'path':<11} {'fwd+bwd s':>10} {'peak MiB':>9} {'time/ours':>10} {'mem/ours':>9}")
    for what in ("core", "attention", "layer"):
        runs = {path: make_pass(layer, x_BSD, what, path) for path in ("sparse", "dense", "dense-math")}
        results = measure(runs, args.repeats)
        t0, m0 = results["sparse"]
        for path, (seconds, peak) in results.items():
            row = f"{what:<10} {path:<11} {seconds:>10.3f} {peak / 2**20:>9.1f}"
            print(f"{row} {seconds / t0:>9.2f}x {peak / m0:>8.2f}x")
    print("\ncore = attend() only (between the projections); attention = CLIPViPAttention incl. q/k/v/out")
    print("projections; layer = CLIPViPEncoderLayer (LNs, attention, MLP).")


if __name__ == "__main__":
    main()
