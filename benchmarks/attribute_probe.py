"""Where a model loses the scenes' attributes: denoising them, or generating them.

Renders one striped, dotted and outlined object of four colour/shape pairs at the model's
resolution, and prints the fraction whose attribute the scorer (evaluate/alignment.py) finds:

- in x̂ from one model call on the image noised to λ (can it *denoise* the attribute?);
- in the sample of a DDIM run started from the image noised to λ0 (can it *generate* the
  attribute from there on? Below the λ0 where this drops, the model does not draw it).

    python benchmarks/attribute_probe.py --model scenes-128
"""

from __future__ import annotations

import argparse

import torch

from greedygrow.data.draw import render
from greedygrow.data.scenes import Group, make_scene
from greedygrow.data.transforms import to_tensor
from greedygrow.diffusion import add_noise, alpha_sigma, eps_from_v, x_from_v
from greedygrow.evaluate.alignment import detect
from greedygrow.sample import load_for_sampling, to_uint8
from greedygrow.sampling import guided, logsnr_grid, native_bf16, uvit_denoiser
from greedygrow.shipped import resolve_model

ATTRIBUTES = ("striped", "dotted", "outlined")
OBJECTS = (("red", "circle"), ("blue", "square"), ("orange", "circle"), ("green", "triangle"))


def found(x: torch.Tensor, cases: list[tuple[str, str, str]]) -> dict[str, float]:
    """Per attribute, the fraction of images x [N, 3, R, R] whose object has it."""
    hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for image, (color, shape, attr) in zip(
        to_uint8(x).permute(0, 2, 3, 1).numpy(), cases, strict=True
    ):
        ds = [d for d in detect(image) if (d.color, d.shape) == (color, shape)]
        hits[attr].append(any(d.attribute == attr for d in ds))
    return {a: sum(h) / len(h) for a, h in hits.items()}


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="run folder or shipped model name")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=25, help="the sampler's λ grid (as dpmpp2m's)")
    p.add_argument("--repeats", type=int, default=3, help="noise draws per image")
    args = p.parse_args()
    torch.manual_seed(0)
    model, encoder, schedule, _ = load_for_sampling(resolve_model(args.model))
    model.eval()
    res = model.shell_config.resolution
    cases = [(c, s, a) for a in ATTRIBUTES for c, s in OBJECTS]
    scenes = [make_scene([Group(c, s, a, 1)], seed=i) for i, (c, s, a) in enumerate(cases)]
    x = torch.stack([to_tensor(render(sc, res)) for sc in scenes])
    n = len(x)
    text = encoder.encode([sc.caption for sc in scenes])
    denoise = uvit_denoiser(model, text.tokens, text.mask, text.pooled)
    v_hat = guided(denoise, args.guidance, None, torch.device("cpu"), native_bf16("cpu"))
    print(f"{args.model}: {n} images at {res} px; fraction with the attribute found")

    print("clean renders:", found(x, cases))
    print("denoise: x̂ of one call at λ")
    for lam in (-2.0, -1.0, 0.0, 1.0, 2.0, 4.0):
        scores = [
            found(x_from_v(z, v_hat(z, lam), torch.tensor(lam)), cases)
            for z in (
                add_noise(x, torch.randn_like(x), torch.tensor(lam)) for _ in range(args.repeats)
            )
        ]
        print(
            f"  λ {lam:+.0f}",
            {a: round(sum(s[a] for s in scores) / len(scores), 2) for a in ATTRIBUTES},
        )
    print("generate: DDIM from the image noised to λ0, on the sampler's grid above λ0")
    grid = logsnr_grid(schedule, args.steps)
    for lam0 in (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0):
        lams = [lam0] + [lam for lam in grid if lam > lam0]
        z = add_noise(x, torch.randn_like(x), torch.tensor(lam0))
        for i, lam in enumerate(lams):
            v = v_hat(z, lam)
            xh = x_from_v(z, v, torch.tensor(lam))  # x̂ = α_t z − σ_t v̂
            if i + 1 < len(lams):
                a_s, s_s = (float(c) for c in alpha_sigma(torch.tensor(lams[i + 1])))
                # z_s = α_s x̂ + σ_s ε̂  (DDIM, η = 0; Song et al. 2021, eq. 12)
                z = a_s * xh + s_s * eps_from_v(z, v, torch.tensor(lam))
        print(
            f"  λ0 {lam0:+.0f}", {a: round(f, 2) for a, f in found(xh.clamp(-1, 1), cases).items()}
        )


if __name__ == "__main__":
    main()
