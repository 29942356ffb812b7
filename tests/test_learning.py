"""A tiny UViT trained with the diffusion loss overfits one fixed batch."""

import time

import torch
import torch.nn.functional as F

from greedygrow.diffusion import schedule_for, training_loss
from greedygrow.model import CoreConfig, UViT, shell_preset

STEPS = 120


def test_tiny_uvit_overfits_one_fixed_batch():
    # one thread: this model is too small to gain from two, and on a shared machine the
    # second thread's spin-waits cost more than it brings
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_overfit()
    finally:
        torch.set_num_threads(threads)


def run_overfit():
    torch.manual_seed(0)
    core = CoreConfig(width=64, depth=2, heads=2, grid=8, text_dim=32, text_len=8, fourier_dim=32)
    model = UViT(core, shell_preset("shallow", 16, "cpu", grid=8, channels=(32,)))
    g = torch.Generator().manual_seed(0)
    b = 8
    images = F.interpolate(torch.rand(b, 3, 4, 4, generator=g) * 2 - 1, scale_factor=4)
    tokens, pooled = torch.randn(b, 8, 32, generator=g), torch.randn(b, 32, generator=g)
    mask = torch.ones(b, 8, dtype=torch.bool)
    mask[::2, 5:] = False
    schedule = schedule_for(16)
    t, noise = (
        torch.rand(b, generator=g, dtype=torch.float64),
        torch.randn(images.shape, generator=g),
    )

    def loss() -> torch.Tensor:
        # the same seed every step: the same t and noise, so the batch is fully fixed
        denoise = lambda z, logsnr: model(z, logsnr, tokens, mask, pooled)
        return training_loss(denoise, images, schedule, t, noise)

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    start = time.perf_counter()
    with torch.no_grad():
        initial = loss().mean().item()
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss().mean().backward()
        opt.step()
    with torch.no_grad():
        final = loss().mean().item()
    elapsed = time.perf_counter() - start
    ratio = initial / final
    print(f"loss {initial:.4f} -> {final:.5f} ({ratio:.0f}x), {STEPS} steps, {elapsed:.1f}s")
    assert 0.3 < initial < 3.0  # zero-initialised output: v-MSE of v̂ = 0 is about E[v²] ≈ 1
    assert final < initial / 10
