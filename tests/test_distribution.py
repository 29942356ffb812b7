"""Distribution metrics (Fréchet distance, CMMD, CLIPScore) and the feature networks."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file
from torch import nn

from greedygrow.evaluate.distribution import (
    Extractors,
    FeatureStats,
    clip_score,
    cmmd,
    distribution_metrics,
    fid_from_features,
    frechet_distance,
    reference_stats,
)
from greedygrow.evaluate.features import (
    ClipFeatures,
    DinoV2Features,
    FeatureExtractor,
    InceptionFID,
    WeightsUnavailableError,
    extract_features,
    load_extractor,
)


def scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)
    )


@pytest.mark.parametrize("dim", [8, 64, 128])
def test_frechet_matches_scipy_sqrtm_reference(dim):
    rng = np.random.default_rng(dim)
    x = rng.normal(size=(4 * dim, dim)) @ rng.normal(size=(dim, dim))
    y = rng.normal(size=(4 * dim, dim)) @ rng.normal(size=(dim, dim)) + 0.3
    a, b = FeatureStats.from_features(x), FeatureStats.from_features(y)
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    ref = scipy_frechet(a.mu, a.sigma, b.mu, b.sigma)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_frechet_exact_for_singular_diagonal_covariances():
    rng = np.random.default_rng(0)
    d1 = rng.uniform(0, 2, 50)
    d2 = rng.uniform(0, 2, 50)
    d1[:20] = 0.0  # rank-deficient: 20 zero directions
    d2[10:30] = 0.0
    mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
    # for commuting (diagonal) covariances tr((Σ1Σ2)^{1/2}) = Σ sqrt(a_i b_i)
    expected = ((mu1 - mu2) ** 2).sum() + d1.sum() + d2.sum() - 2 * np.sqrt(d1 * d2).sum()
    got = frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_of_rank_deficient_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 128)) * 100  # 40 samples in 128 dims: rank ≤ 39
    fd = fid_from_features(x, x)
    trace = np.trace(np.cov(x, rowvar=False))
    assert 0.0 <= fd <= 1e-9 * trace
    # a pure shift δ of every feature moves only the means: FD = ‖δ‖² = 128 · 3²
    assert fid_from_features(x, x + 3.0) == pytest.approx(128 * 9.0, rel=1e-3)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_cmmd_of_a_set_with_itself_is_zero_up_to_the_unbiased_correction():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(200, 32, generator=g), dim=1)
    assert cmmd(x, x, unbiased=False) == pytest.approx(0.0, abs=1e-6)  # float64 round-off × 1000
    k = torch.exp(-(torch.cdist(x.double(), x.double()) ** 2) / 200)
    off_diagonal = (k.sum() - 200) / (200 * 199)
    correction = -2 * (1 - off_diagonal.item()) / 200  # MMD²_u(x, x), from the definition
    assert cmmd(x, x) == pytest.approx(1000 * correction, rel=1e-9)
    y = torch.nn.functional.normalize(torch.randn(200, 32, generator=g) + 0.5, dim=1)
    assert cmmd(x, y) > 10 * abs(cmmd(x, x))  # another distribution is far from that


@pytest.mark.parametrize("m, n", [(30, 17), (25, 25)])
def test_unbiased_mmd_matches_the_u_statistic(m, n):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(m, 5, generator=g).double(), torch.randn(n, 5, generator=g).double() + 1
    k = lambda a, b: torch.exp(-(torch.cdist(a, b) ** 2) / 200)
    kxx, kyy = k(x, x), k(y, y)
    expected = (
        (kxx.sum() - kxx.trace()) / (m * (m - 1))
        + (kyy.sum() - kyy.trace()) / (n * (n - 1))
        - 2 * k(x, y).mean()
    )
    assert cmmd(x, y) == pytest.approx(1000 * expected.item(), rel=1e-9)


def test_cmmd_does_not_depend_on_the_order_of_either_set():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=g)
    y = x + 0.3 * torch.randn(40, 6, generator=g)  # y[i] close to x[i], as in paired evaluation
    reference = cmmd(x, y)
    assert cmmd(x, y.flip(0)) == pytest.approx(reference, rel=1e-9)
    assert cmmd(x[torch.randperm(40, generator=g)], y) == pytest.approx(reference, rel=1e-9)


def test_cmmd_grows_with_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=g)
    y = torch.randn(300, 16, generator=g)
    values = [cmmd(x, y + s) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(b > a for a, b in itertools.pairwise(values))
    assert abs(values[0]) < 0.2 * values[1]


def test_unbiased_mmd_is_centred_on_zero_for_equal_distributions():
    g = torch.Generator().manual_seed(2)
    unbiased, biased = [], []
    for _ in range(30):
        x, y = torch.randn(20, 8, generator=g) * 5, torch.randn(20, 8, generator=g) * 5
        unbiased.append(cmmd(x, y))
        biased.append(cmmd(x, y, unbiased=False))
    ub, b = np.array(unbiased), np.array(biased)
    assert abs(ub.mean()) < 3 * ub.std() / np.sqrt(len(ub))  # no detectable bias
    assert b.mean() > 3 * b.std() / np.sqrt(len(b))  # the V-statistic is biased upwards


def test_clip_score_is_100_cosine_clipped_at_zero():
    g = torch.Generator().manual_seed(3)
    img = torch.randn(64, 24, generator=g)
    txt = torch.randn(64, 24, generator=g)
    s = clip_score(img, txt)
    assert s.shape == (64,) and (s >= 0).all() and (s <= 100).all()
    assert (s == 0).any()  # some random pairs have negative cosine and are clipped
    assert clip_score(img, img * 3) == pytest.approx(torch.full((64,), 100.0), abs=1e-4)
    assert (clip_score(img, -img) == 0).all()
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert torch.allclose(s, 100 * cos.clamp_min(0), atol=1e-5)


def test_inception_has_exactly_torchvisions_inception_v3_parameters():
    # torchvision's inception_v3: 27,161,264 parameters, of which AuxLogits 3,326,696 and the
    # 1000-way fc 2,049,000; the FID network is the rest (the ported weights' fc is unused)
    net = InceptionFID()
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 - 2_049_000
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool


def test_inception_loads_ported_state_dict_from_pth_and_safetensors(tmp_path):
    torch.manual_seed(0)
    net = InceptionFID()
    for m in net.modules():  # non-trivial running statistics so a bad load would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = dict(net.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / "fid.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "fid.safetensors"))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    ref = net(images)
    assert ref.shape == (2, 2048) and torch.isfinite(ref).all()
    for name in ("fid.pth", "fid.safetensors"):
        loaded = load_extractor("inception", str(tmp_path / name))
        assert loaded.id.startswith("inception-v3-fid@")
        for key, value in net.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.allclose(loaded(images), ref, atol=1e-5)


def test_inception_rejects_a_wrong_state_dict(tmp_path):
    save_file({"conv.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="not an FID InceptionV3"):
        InceptionFID.from_file(tmp_path / "bad.safetensors")


def test_missing_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("GREEDYGROW_INCEPTION", raising=False)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsUnavailableError, match=r"pt_inception-2015-12-05.*--inception"):
        load_extractor("inception", str(missing))
    with pytest.raises(WeightsUnavailableError, match=r"facebook/dinov2-large.*--dino PATH"):
        load_extractor("dinov2", local_files_only=True)
    with pytest.raises(WeightsUnavailableError, match=r"--clip PATH"):
        load_extractor("clip", str(tmp_path / "no-clip-here"), local_files_only=True)
    ext = Extractors.load(inception=str(missing), kinds=["inception"])
    assert ext.inception is None and "pt_inception" in ext.notes["inception"]


# ---- end to end with small randomly initialised networks of the real interfaces --------


def tiny_clip() -> ClipFeatures:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=300,
            max_position_embeddings=40,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )

    def tokenize(captions):
        ids = [[1, *[3 + (ord(c) % 290) for c in s[:30]], 2] for s in captions]
        width = max(map(len, ids))
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
        return torch.tensor([i + [0] * (width - len(i)) for i in ids]), mask

    return ClipFeatures(CLIPModel(cfg), tokenize, id="tiny-clip")


def tiny_dino() -> DinoV2Features:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
    )
    return DinoV2Features(Dinov2Model(cfg), id="tiny-dino", image_size=28)


class TinyConvFeatures(FeatureExtractor):
    """A stand-in for the Inception network: same interface, a few random convolutions."""

    def __init__(self):
        super().__init__()
        self.id, self.dim = "tiny-conv", 12
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 12, 3, stride=2), nn.ReLU(), nn.Conv2d(12, 12, 3, stride=2)
        )

    def features(self, images):
        return self.net(images).mean(dim=(2, 3))


def test_metrics_end_to_end_with_random_networks_and_cached_references(tmp_path):
    g = torch.Generator().manual_seed(5)
    refs = torch.rand(24, 3, 48, 48, generator=g) * 2 - 1
    same = refs.clone()
    shifted = (refs + 0.6).clamp(-1, 1)
    calls = []

    def references():
        calls.append(1)
        return refs.split(10)

    ext = Extractors(inception=TinyConvFeatures(), dinov2=tiny_dino(), clip=tiny_clip())
    prompts = [f"a red circle number {i}" for i in range(24)]
    kw = dict(references=("toy-refs", references), cache_dir=tmp_path, batch_size=8)
    m_same = distribution_metrics(same, prompts, ext, **kw)
    m_shift = distribution_metrics(shifted, prompts, ext, **kw)
    assert set(m_same) == {"fid", "fd_dinov2", "cmmd", "clip_score"}
    assert m_same["fid"] < 1e-6 * m_shift["fid"] + 1e-9
    assert m_same["fd_dinov2"] < m_shift["fd_dinov2"]
    assert m_same["cmmd"] < m_shift["cmmd"]
    assert 0 <= m_same["clip_score"] <= 100
    assert len(calls) == 3  # one pass per extractor, then served from the cache
    assert len(list(tmp_path.glob("toy-refs--*.safetensors"))) == 3
    cached = reference_stats(ext.clip, "toy-refs", references, tmp_path, keep_features=True)
    assert cached.features.shape == (24, 16) and len(calls) == 3
    direct = extract_features(ext.clip, refs)
    assert np.allclose(cached.features, direct.numpy(), atol=1e-5)


def test_metrics_without_references_give_only_clip_score():
    ext = Extractors(inception=TinyConvFeatures(), clip=tiny_clip())
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    m = distribution_metrics(images, ["a blue square"] * 4, ext)
    assert set(m) == {"clip_score"}


def test_missing_hub_weights_are_reported_without_importing_the_model_code():
    # importing transformers' DINOv2 and CLIP code costs seconds; absent weights need none of it
    code = (
        "import sys; from greedygrow.evaluate.distribution import Extractors; "
        "e = Extractors.load(dinov2='greedygrow-tests/no-dino', clip='greedygrow-tests/no-clip', "
        "kinds=['dinov2', 'clip']); assert set(e.notes) == {'dinov2', 'clip'}, e.notes; "
        "print(sorted(m for m in sys.modules if m.startswith('transformers.models.')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "GREEDYGROW_ALLOW_DOWNLOAD"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "dinov2" not in out.stdout and "clip" not in out.stdout
