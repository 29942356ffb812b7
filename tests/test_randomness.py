"""Counter-based draws: the integer reference's bits on tensors, a step's randomness per sample a
function of (seed, step, global index) alone, and the right distributions."""

import numpy as np
import pytest
import torch

from greedygrow.config import train_core_config
from greedygrow.data.split import (
    GOLDEN,
    counter_draws,
    counter_normals,
    mix_seed,
    mix_seed_tensor,
    splitmix64,
)
from greedygrow.train import _step_randomness


def test_tensor_mix_seed_gives_the_integer_reference():
    last = [0, 1, 2**40 + 7, 2**62 - 1]
    mixed = mix_seed_tensor((5, 2**33), torch.tensor(last))
    assert mixed.tolist() == [mix_seed(5, 2**33, v) for v in last]


def test_counter_draws_and_normals_follow_their_formulas_from_the_integer_reference():
    keys = np.random.default_rng(0).integers(0, 2**64, size=500, dtype=np.uint64)
    j = np.arange(1, 7, dtype=np.uint64)
    h = splitmix64(keys[:, None] + j * np.uint64(GOLDEN))  # draw j of each key
    tkeys = torch.from_numpy(keys.view(np.int64).copy())
    assert np.array_equal(counter_draws(tkeys, 6).numpy().view(np.uint64), h)
    u1 = ((h[:, 2:] >> np.uint64(40)) + np.uint64(1)).astype(np.float64) * 2.0**-24
    u2 = (h[:, 2:] & np.uint64(0xFFFFFF)).astype(np.float64) * 2.0**-24
    r, theta = np.sqrt(-2 * np.log(u1)), 2 * np.pi * u2
    want = np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1)
    np.testing.assert_allclose(counter_normals(tkeys, 3, 4).numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_samples_draws_depend_only_on_seed_step_and_global_index(threads):
    cfg = train_core_config(None, ["run.seed=3"])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = _step_randomness(cfg, 7, 16, torch.zeros(8, 3, 16, 16))
        half = _step_randomness(cfg, 7, 20, torch.zeros(4, 3, 16, 16))  # samples 20..23
    finally:
        torch.set_num_threads(before)
    for a, b in zip(whole, half, strict=True):
        assert torch.equal(a[4:], b)
    other_step = _step_randomness(cfg, 8, 16, torch.zeros(8, 3, 16, 16))
    assert not torch.equal(whole[2], other_step[2])


def test_step_draws_are_standard_normal_noise_uniform_t_and_the_dropout_rate():
    cfg = train_core_config(None, ["data.caption_dropout=0.25"])
    drop, t, noise = _step_randomness(cfg, 0, 0, torch.zeros(4096, 3, 8, 8))
    assert noise.dtype == torch.float32 and t.dtype == torch.float64
    z = noise.double().flatten()
    assert abs(z.mean()) < 0.005 and abs(z.std() - 1) < 0.005
    assert abs((z**4).mean() - 3) < 0.05  # normal kurtosis
    assert abs((z.abs() < 1).double().mean() - 0.6827) < 0.003
    flat = noise.flatten(1)
    for shift in (1, 96):  # neighbours, and a cos value against its sin partner
        r = torch.corrcoef(torch.stack([flat[:, :-shift].flatten(), flat[:, shift:].flatten()]))
        assert abs(r[0, 1]) < 0.01
    assert abs(t.mean() - 0.5) < 0.02 and t.min() >= 0 and t.max() < 1
    assert abs(drop.double().mean() - 0.25) < 0.03
