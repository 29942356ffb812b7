"""Schedules, noising, v-prediction conversions and the training loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from greedygrow.diffusion import (
    MIN_SNR_GAMMA,
    SIGMOID_BIAS,
    Schedule,
    add_noise,
    alpha_sigma,
    eps_from_v,
    schedule_for,
    training_loss,
    v_target,
    x_from_v,
)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # unseeded draws (weights, test inputs) repeat from run to run


T = torch.linspace(0, 1, 1001, dtype=torch.float64)


def cosine_reference(t: float, lo: float = -15.0, hi: float = 15.0) -> float:
    a, b = math.atan(math.exp(-hi / 2)), math.atan(math.exp(-lo / 2))
    return -2 * math.log(math.tan(a + t * (b - a)))


def test_cosine_endpoints_equal_clip_bounds():
    lam = Schedule("cosine").logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert lam.tolist() == pytest.approx([15.0, -15.0], abs=1e-9)
    lam = Schedule("cosine", logsnr_min=-10.0, logsnr_max=7.0).logsnr(torch.tensor([0.0, 1.0]))
    assert lam.tolist() == pytest.approx([7.0, -10.0], abs=1e-5)


def test_cosine_matches_formula_and_decreases():
    lam = Schedule("cosine").logsnr(T)
    assert lam[::100].tolist() == pytest.approx([cosine_reference(t) for t in T[::100].tolist()])
    assert (lam.diff() < 0).all()
    assert lam[500].item() == pytest.approx(0.0, abs=1e-9)  # symmetric bounds → λ(½) = 0


@pytest.mark.parametrize("resolution", [32, 128, 256, 512, 1024])
def test_shifted_equals_cosine_plus_log_ratio_inside_bounds(resolution):
    cosine = Schedule("cosine").logsnr(T)
    shifted = Schedule("shifted", resolution=resolution).logsnr(T)
    expected = cosine + 2 * math.log(64 / resolution)
    inside = (expected > -15) & (expected < 15)
    assert inside.sum() > 900
    torch.testing.assert_close(shifted[inside], expected[inside], rtol=0, atol=1e-12)
    assert (shifted[~inside].abs() == 15).all()  # clamped to the bounds outside
    assert shifted.min() >= -15 and shifted.max() <= 15


def test_shifted_at_base_resolution_is_cosine():
    torch.testing.assert_close(Schedule("shifted", 64).logsnr(T), Schedule("cosine").logsnr(T))


@pytest.mark.parametrize("resolution", [512, 1024])
def test_interpolated_matches_its_formula(resolution):
    def shifted(t: float, d: int) -> float:
        return min(15.0, max(-15.0, cosine_reference(t) + 2 * math.log(d / resolution)))

    lam = Schedule("interpolated", resolution=resolution).logsnr(T)
    ts = T[::50].tolist()
    expected = [t * shifted(t, 32) + (1 - t) * shifted(t, 256) for t in ts]
    assert lam[::50].tolist() == pytest.approx(expected, abs=1e-9)
    # strongly shifted (noisier) near t = 1, mildly near t = 0: it lies between the two shifts
    assert lam[100].item() > shifted(0.1, 32) + 3.0
    assert lam[0].item() == pytest.approx(15 + 2 * math.log(256 / resolution))


def test_schedule_for_picks_cosine_shifted_interpolated():
    assert schedule_for(64).kind == "cosine"
    assert [schedule_for(r).kind for r in (32, 128, 256)] == ["shifted"] * 3
    assert [schedule_for(r).kind for r in (512, 1024)] == ["interpolated"] * 2
    assert schedule_for(512, "shifted") == Schedule("shifted", resolution=512)


def test_schedule_round_trips_through_dict_and_rejects_bad_input():
    s = schedule_for(512)
    assert Schedule.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="kind"):
        Schedule("linear")
    with pytest.raises(ValueError, match="resolution"):
        schedule_for(0)
    with pytest.raises(ValueError, match="unknown keys"):
        Schedule.from_dict({"kind": "cosine", "shift": 2})


def test_alpha_squared_plus_sigma_squared_is_one():
    lam = torch.linspace(-20, 20, 401, dtype=torch.float64)
    a, s = alpha_sigma(lam)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(lam), rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.log(a**2 / s**2), lam, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_conversions_recover_x_and_eps_from_z_and_v(dtype, atol):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g, dtype=dtype) * 2 - 1
    eps = torch.randn(6, 3, 8, 8, generator=g, dtype=dtype)
    lam = torch.tensor([-15.0, -4.0, -0.5, 0.0, 3.0, 15.0], dtype=dtype)
    z = add_noise(x, eps, lam)
    a, s = alpha_sigma(lam.view(-1, 1, 1, 1))
    torch.testing.assert_close(z, a * x + s * eps, rtol=0, atol=atol)
    v = v_target(x, eps, lam)
    torch.testing.assert_close(x_from_v(z, v, lam), x, rtol=0, atol=atol)
    torch.testing.assert_close(eps_from_v(z, v, lam), eps, rtol=0, atol=atol)


def test_conversions_reject_mismatched_logsnr():
    with pytest.raises(ValueError, match="logsnr"):
        add_noise(torch.zeros(4, 3, 2, 2), torch.zeros(4, 3, 2, 2), torch.zeros(3))


def exact_v_denoiser(x, record=None, residual=None):
    """Returns the true v for the x that was noised, plus a chosen residual.

    v = α ε − σ x with ε = (z − α x)/σ recovered from z ((α z − x)/σ is the same in exact
    arithmetic, but leans on α² + σ² = 1, which fp32 α, σ only meet to ~1e-7: divided by σ
    ≈ 5e-4 near λ = 15 that is no longer "exact").
    """

    def denoise(z, logsnr):
        if record is not None:
            record.append((z.clone(), logsnr.clone()))
        a, s = alpha_sigma(logsnr.view(-1, 1, 1, 1))
        v = a * (z - a * x) / s - s * x
        return v if residual is None else v + residual

    return denoise


def drawn(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """t ~ U(0, 1) per sample and Gaussian noise like x, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(x.shape[0], generator=g, dtype=torch.float64)
    return {"t": t, "noise": torch.randn(x.shape, generator=g, dtype=x.dtype)}


@pytest.mark.parametrize("weighting", ["v_mse", "sigmoid", "min_snr"])
def test_loss_is_zero_for_the_true_v(weighting):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(8, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0.0, 1e-4, 0.01, 0.3, 0.5, 0.7, 0.99, 1.0], dtype=torch.float64)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
    loss = training_loss(exact_v_denoiser(x), x, schedule_for(64), t, noise, weighting)
    assert loss.shape == (8,)
    assert loss.abs().max() < 1e-12


def test_weightings_follow_their_formulas():
    x = torch.rand(16, 3, 8, 8, dtype=torch.float64) * 2 - 1
    losses, zs = {}, {}
    for w in ("v_mse", "sigmoid", "min_snr"):
        record = []

        def zero(z, logsnr, record=record):
            record.append((z, logsnr))
            return torch.zeros_like(z)

        losses[w] = training_loss(zero, x, schedule_for(64), **drawn(x, seed=3), weighting=w)
        zs[w] = record[0]
    z, lam = zs["v_mse"]
    torch.testing.assert_close(zs["sigmoid"][0], z)  # same seed → same t and noise
    a, s = alpha_sigma(lam.double().view(-1, 1, 1, 1))
    eps = (z - a * x) / s
    v_mse = (a * eps - s * x).square().mean((1, 2, 3))  # v̂ = 0 → ‖v‖²
    eps_mse = ((s * z - eps) ** 2).mean((1, 2, 3))  # v̂ = 0 → ε̂ = σ z
    snr = lam.double().exp()
    torch.testing.assert_close(losses["v_mse"], v_mse, rtol=1e-5, atol=1e-7)
    a_, b_ = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
    slope = 4 * (b_ - a_) * torch.cosh(lam.double() / 2)  # −dλ/dt of the cosine, from λ alone
    sig = 0.5 * torch.sigmoid(SIGMOID_BIAS - lam.double()) * slope * eps_mse
    torch.testing.assert_close(losses["sigmoid"].double(), sig, rtol=1e-4, atol=1e-7)
    msnr = snr.clamp(max=MIN_SNR_GAMMA) / (snr + 1) * v_mse
    torch.testing.assert_close(losses["min_snr"].double(), msnr, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "schedule", [Schedule(), schedule_for(128), schedule_for(512), schedule_for(1024)]
)
def test_dlogsnr_dt_matches_finite_differences(schedule):
    t = torch.linspace(0.02, 0.98, 97, dtype=torch.float64)
    h = 1e-6
    numeric = (schedule.logsnr(t + h) - schedule.logsnr(t - h)) / (2 * h)
    lam = schedule.logsnr(t)
    clamped = (lam - schedule.logsnr_min).abs() < 1e-3  # the kink where the clamp starts
    analytic = schedule.dlogsnr_dt(t)
    torch.testing.assert_close(analytic[~clamped], numeric[~clamped], rtol=1e-6, atol=1e-6)
    assert (analytic <= 0).all()


@pytest.mark.parametrize(
    "schedule", [Schedule(), schedule_for(32), schedule_for(512), schedule_for(1024)]
)
def test_sigmoid_weighting_is_one_density_in_logsnr_whatever_the_schedule(schedule):
    # With ‖ε̂ − ε‖² = 1 everywhere, E_t[L] = ½ ∫ sigmoid(b − λ) dλ over the schedule's λ range
    # = ½ [softplus(b − λ(1)) − softplus(b − λ(0))]: t's density must not leak into the weight.
    n = 200_000
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # midpoint rule over t
    x = torch.zeros(n, 1, dtype=torch.float64)
    noise = torch.ones(n, 1, dtype=torch.float64)

    def off_by_one_eps(z, logsnr):  # v̂ = v + 1/α, so ε̂ − ε = α (v̂ − v) = 1
        a, _ = alpha_sigma(logsnr.double().view(-1, 1))
        return v_target(x, noise, logsnr.double()) + 1 / a

    loss = training_loss(off_by_one_eps, x, schedule, t, noise, "sigmoid")
    b = SIGMOID_BIAS
    ends = schedule.logsnr(torch.tensor([1.0, 0.0], dtype=torch.float64))
    expected = 0.5 * (F.softplus(b - ends[0]) - F.softplus(b - ends[1]))
    assert loss.mean().item() == pytest.approx(expected.item(), rel=2e-3)


def test_multiscale_loss_averages_pooled_residuals_down_to_32px():
    x = torch.rand(2, 3, 128, 128, dtype=torch.float64) * 2 - 1
    r = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    r = r + 3 * F.interpolate(torch.randn(2, 3, 4, 4, dtype=torch.float64), scale_factor=32)
    loss = training_loss(
        exact_v_denoiser(x, residual=r), x, schedule_for(128), **drawn(x), multiscale=True
    )
    scales = [r, F.avg_pool2d(r, 2), F.avg_pool2d(r, 4)]  # 128, 64, 32 px
    expected = torch.stack([s.square().mean((1, 2, 3)) for s in scales]).mean(0)
    torch.testing.assert_close(loss, expected, rtol=1e-8, atol=0)
    single = training_loss(exact_v_denoiser(x, residual=r), x, schedule_for(128), **drawn(x))
    torch.testing.assert_close(single, r.square().mean((1, 2, 3)), rtol=1e-8, atol=0)


def test_same_t_and_noise_give_same_loss_and_gradients_flow():
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    denoise = lambda z, logsnr: net(z)
    l1 = training_loss(denoise, x, Schedule(), **drawn(x, seed=5))
    l2 = training_loss(denoise, x, Schedule(), **drawn(x, seed=5))
    l3 = training_loss(denoise, x, Schedule(), **drawn(x, seed=6))
    torch.testing.assert_close(l1, l2)
    assert not torch.allclose(l1, l3)
    l1.mean().backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_given_t_and_noise_are_used():
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    noise = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    record = []
    training_loss(exact_v_denoiser(x, record), x, schedule_for(64), t, noise)
    z, lam = record[0]
    torch.testing.assert_close(lam, schedule_for(64).logsnr(t).float())
    torch.testing.assert_close(z, add_noise(x, noise, lam))
    with pytest.raises(ValueError, match="noise"):
        training_loss(exact_v_denoiser(x), x, schedule_for(64), t, noise[:2])


def test_training_loss_rejects_bad_weighting_and_options():
    x = torch.zeros(2, 3, 4, 4)
    denoise = lambda z, logsnr: z
    with pytest.raises(ValueError, match="weighting"):
        training_loss(denoise, x, Schedule(), **drawn(x), weighting="l1")
    with pytest.raises(ValueError, match="shape"):
        training_loss(lambda z, logsnr: z[:, :1], x, Schedule(), **drawn(x))
