"""Post-hoc EMA: power-function profiles, snapshot files and least-squares synthesis (EDM2)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from greedygrow.posthoc_ema import (
    PowerEMA,
    load_snapshots,
    save_snapshot,
    sigma_rel_to_gamma,
    synthesize,
)

SHAPES = [(16,), (4, 8), (5,)]


def _sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def test_gamma_matches_the_papers_values():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.001, 0.03, 0.07, 0.15, 0.25, 0.288):
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma > 0
        assert _sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.05, 0.29, 0.5, float("nan")])
def test_sigma_rel_out_of_range_is_refused_clearly(sigma_rel):
    with pytest.raises(ValueError, match=r"outside \(0, 0\.2887\).*pass a relative EMA length"):
        sigma_rel_to_gamma(sigma_rel)


def test_power_ema_after_the_first_step_equals_the_weights():
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    profiles = [[torch.randn(s) for s in SHAPES] for _ in range(2)]
    PowerEMA((0.05, 0.10)).update(1, profiles, params)
    for profile in profiles:
        assert all(torch.equal(e, p) for e, p in zip(profile, params, strict=True))


def test_a_skipped_update_leaves_the_profiles_as_they_were():
    g = torch.Generator().manual_seed(4)
    profiles = [[torch.randn(s, generator=g) for s in SHAPES]]
    before = [t.clone() for t in profiles[0]]
    ema = PowerEMA((0.10,))
    ema.update(7, profiles, [torch.randn(s, generator=g) for s in SHAPES], torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(profiles[0], before, strict=True))
    ema.update(8, profiles, [torch.randn(s, generator=g) for s in SHAPES], torch.tensor(1.0))
    assert not torch.equal(profiles[0][0], before[0])


def test_power_ema_weights_step_i_by_the_power_profile_integrated_over_it():
    # The recursion is exact for w_i ∝ i^(γ+1) - (i-1)^(γ+1) = ∫_{i-1}^{i} (γ+1)τ^γ dτ,
    # and only approximately ∝ i^γ.
    n, sigma_rel = 40, 0.10
    gamma = sigma_rel_to_gamma(sigma_rel)
    theta = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ema, profile = PowerEMA((sigma_rel,)), [theta[:1].clone()]
    for step in range(1, n + 1):
        ema.update(step, [profile], [theta[step - 1 : step]])
    got = profile[0].item()
    i = np.arange(1, n + 1, dtype=np.float64)
    exact = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / n ** (gamma + 1)
    assert got == pytest.approx(float(exact @ theta.numpy()), abs=1e-13)
    power = i**gamma / (i**gamma).sum()
    gap = abs(got - float(power @ theta.numpy()))
    assert 1e-6 < gap < 0.02  # close but not equal: i^γ is the midpoint approximation


@pytest.fixture(scope="module")
def random_walk(tmp_path_factory):
    """2000 steps of drift + noise; snapshots of σ_rel 0.05 and 0.10 every 100 steps, and
    directly tracked EMAs of other lengths, at step 1000 and at the end."""
    folder = tmp_path_factory.mktemp("ema")
    g = torch.Generator().manual_seed(0)
    params = [torch.zeros(s) for s in SHAPES]
    drift = [torch.randn(s, generator=g) for s in SHAPES]
    tracked, direct = PowerEMA((0.05, 0.10)), PowerEMA((0.03, 0.07, 0.15))
    kept = [[p.clone() for p in params] for _ in tracked.sigma_rels]
    checked = [[p.clone() for p in params] for _ in direct.sigma_rels]
    states = {}
    for step in range(1, 2001):
        for p, d in zip(params, drift, strict=True):
            p.add_(0.01 * d + 0.1 * torch.randn(p.shape, generator=g))
        tracked.update(step, kept, params)
        direct.update(step, checked, params)
        if step % 100 == 0:
            snapshot = {
                f"{s:g}/p{i}": t.clone()
                for s, profile in zip(tracked.sigma_rels, kept, strict=True)
                for i, t in enumerate(profile)
            }
            save_snapshot(folder, step, tracked.sigma_rels, snapshot)
        if step in (1000, 2000):
            theta = {f"p{i}": p.clone() for i, p in enumerate(params)}
            ema = {
                f"{s:g}/p{i}": t.clone()
                for s, profile in zip(direct.sigma_rels, checked, strict=True)
                for i, t in enumerate(profile)
            }
            states[step] = (ema, theta)
    return folder, states


def _relative_error(folder: Path, states, sigma_rel: float, step: int) -> tuple[float, dict]:
    """‖synthesized - tracked‖ / ‖tracked - θ‖ at ``step``."""
    ema, theta = states[step]
    out, info = synthesize(folder, sigma_rel, None if step == 2000 else step)
    tracked = {name: ema[f"{sigma_rel:g}/{name}"] for name in theta}
    err = sum(((out[n] - tracked[n]) ** 2).sum() for n in theta) ** 0.5
    lag = sum(((theta[n] - tracked[n]) ** 2).sum() for n in theta) ** 0.5
    return float(err / lag), info


# Measured relative errors: 3.4e-4 (0.07), 8.0e-3 (0.03), 5.2e-4 (0.15) at step 2000 and 5.2e-3
# (0.07) at step 1000, where snapshots are twice as sparse relative to t. Offsetting t by 50 steps
# in the solver gives 3.8e-3 and 1.05e-2, so these limits catch a wrong step-to-t mapping.
@pytest.mark.parametrize(
    ("sigma_rel", "step", "limit"),
    [(0.07, 2000, 0.002), (0.07, 1000, 0.008), (0.03, 2000, 0.02), (0.15, 2000, 0.002)],
)
def test_synthesized_ema_matches_a_tracked_one(random_walk, sigma_rel, step, limit):
    error, info = _relative_error(*random_walk, sigma_rel, step)
    assert error < limit
    assert info["step"] == step and info["snapshots"] == 2 * step // 100
    assert info["gamma"] == sigma_rel_to_gamma(sigma_rel)


def test_corrupt_snapshot_gives_an_error_naming_it(tmp_path):
    for step in (100, 200):
        save_snapshot(tmp_path, step, (0.05,), {"0.05/w": torch.randn(64)})
    bad = tmp_path / "ema-00000200.safetensors"
    bad.write_bytes(bad.read_bytes()[:-16])
    with pytest.raises(ValueError, match=r"ema-00000200\.safetensors is not a readable EMA"):
        load_snapshots(tmp_path)
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"ema-00000200\.safetensors is not a readable EMA"):
        synthesize(tmp_path, 0.07)


def test_synthesize_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ema-"):
        synthesize(tmp_path, 0.07)
    save_snapshot(tmp_path, 100, (0.05,), {"0.05/w": torch.randn(4)})
    with pytest.raises(ValueError, match="needs at least 2"):
        synthesize(tmp_path, 0.07)
    save_snapshot(tmp_path, 200, (0.05,), {"0.05/w": torch.randn(4)})
    with pytest.raises(ValueError, match=r"step=50 is outside the snapshots' steps 100\.\.200"):
        synthesize(tmp_path, 0.07, 50)
    out, info = synthesize(tmp_path, 0.07)
    assert list(out) == ["w"] and out["w"].dtype == torch.float32 and info["snapshots"] == 2
