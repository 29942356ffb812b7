"""The UViT: shapes, zero-initialised identities, core portability, text dropout, counts."""

import json

import pytest
import torch

from greedygrow.cli import main
from greedygrow.model import (
    CORE_PRESETS,
    SHELL_PRESETS,
    CoreConfig,
    ShellConfig,
    UViT,
    count_flops,
    count_parameters,
    flop_counter,
    shell_preset,
)
from greedygrow.model.core import Block
from greedygrow.model.layers import Conv2d, Linear, attention, cpu_attention, layer_norm
from greedygrow.model.shell import ResBlock

TINY = CoreConfig(width=32, depth=2, heads=2, text_dim=24, text_len=8, fourier_dim=16)


def tiny_shell(kind: str, resolution: int) -> ShellConfig:
    """A cpu-family shell with 8 channels per level, for speed."""
    levels = shell_preset(kind, resolution, family="cpu").levels
    return shell_preset(kind, resolution, family="cpu", channels=(8,) * levels)


def tiny_uvit(kind: str = "shallow", resolution: int = 64, seed: int = 0) -> UViT:
    torch.manual_seed(seed)
    return UViT(TINY, tiny_shell(kind, resolution))


def randomise_zero_inits(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every all-zero parameter (gates, modulations, last convs) random values, so the
    output depends on every path; a fresh model would output zeros whatever its input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def inputs(batch: int, resolution: int, tokens: int = 5, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[:, tokens - 2 :] = False  # padding at the end
    return {
        "z": torch.randn(batch, 3, resolution, resolution, generator=gen),
        "logsnr": torch.randn(batch, generator=gen) * 5,
        "text_tokens": torch.randn(batch, tokens, TINY.text_dim, generator=gen),
        "text_mask": mask,
        "text_pooled": torch.randn(batch, TINY.text_dim, generator=gen),
    }


@pytest.mark.parametrize(
    ("kind", "resolution", "batch"),
    [
        ("shallow", 64, 2),
        ("grown", 128, 2),
        ("grown", 256, 2),
        ("grown", 512, 2),
        ("grown", 1024, 1),
    ],
)
def test_output_shape_equals_input_shape(kind, resolution, batch):
    model = tiny_uvit(kind, resolution)
    randomise_zero_inits(model)
    x = inputs(batch, resolution)
    with torch.no_grad():
        out = model(**x)
    assert out.shape == x["z"].shape and out.dtype == x["z"].dtype
    assert torch.isfinite(out).all() and out.abs().mean() > 0


def test_fresh_block_is_identity_until_gates_open():
    block = Block(TINY)
    x, emb = torch.randn(2, TINY.tokens, TINY.width), torch.randn(2, TINY.width)
    text, mask = torch.randn(2, 6, TINY.width), torch.ones(2, 1, 1, 6, dtype=torch.bool)
    assert torch.equal(block(x, emb, text, mask), x)
    randomise_zero_inits(block)
    assert not torch.allclose(block(x, emb, text, mask), x)


def test_fresh_resblock_is_identity():
    block = ResBlock(16, 16, cond_dim=8, groups=8, dropout=0.0)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x, torch.randn(2, 8)), x)


def test_fresh_core_stack_is_identity_and_fresh_uvit_outputs_zero():
    model = tiny_uvit()
    x = inputs(2, 64)
    cond = model.core.embed(x["logsnr"], x["text_tokens"], x["text_mask"], x["text_pooled"])
    tokens = torch.randn(2, TINY.tokens, TINY.width)
    # every block is the identity and the final adaLN is a plain LayerNorm
    assert torch.allclose(model.core(tokens, cond), layer_norm(tokens + model.core.pos))
    assert torch.equal(model(**x), torch.zeros_like(x["z"]))


def test_core_state_dict_identical_between_shallow_and_grown():
    shallow, grown = tiny_uvit("shallow", 64, seed=0), tiny_uvit("grown", 256, seed=1)
    a, b = shallow.core.state_dict(), grown.core.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # different seeds: different weights
    grown.core.load_state_dict(a, strict=True)
    assert all(torch.equal(v, grown.core.state_dict()[k]) for k, v in a.items())
    shell_names = {n for n, _ in shallow.named_parameters()} - {
        f"core.{n}" for n, _ in shallow.core.named_parameters()
    }
    assert shell_names and all(n.startswith("shell.") for n in shell_names)


def test_drop_text_changes_output_only_through_null_text():
    model = tiny_uvit()
    randomise_zero_inits(model)
    x = inputs(2, 64)
    drop = torch.tensor([True, False])
    with torch.no_grad():
        base = model(**x, drop_text=drop)
        other = dict(
            x,
            text_tokens=torch.randn_like(x["text_tokens"]),
            text_pooled=torch.randn_like(x["text_pooled"]),
        )
        changed = model(**other, drop_text=drop)
        # the dropped sample ignores its text, the kept one follows it
        assert torch.equal(base[0], changed[0])
        assert not torch.allclose(base[1], changed[1])
        # no dropping equals drop_text=None
        assert torch.allclose(
            model(**x), model(**x, drop_text=torch.tensor([False, False])), atol=1e-6
        )
        model.core.null_text.add_(1.0)
        nulled = model(**x, drop_text=drop)
    assert not torch.allclose(nulled[0], base[0])
    assert torch.allclose(nulled[1], base[1], atol=1e-6)


def test_fully_masked_text_gives_finite_output_equal_to_null_text():
    model = tiny_uvit()
    randomise_zero_inits(model)
    x = inputs(2, 64)
    x["text_mask"][0] = False
    x["text_tokens"][0] = float("nan")  # padding may hold anything
    with torch.no_grad():
        out = model(**x)
        dropped = model(**x, drop_text=torch.tensor([True, False]))
    assert torch.isfinite(out).all()
    assert torch.allclose(out, dropped, atol=1e-6)


def test_meta_parameter_counts_match_real_counts():
    core, shell = CORE_PRESETS["cpu-tiny"], SHELL_PRESETS["cpu-grown-128"]
    counts = count_parameters(core, shell)
    model = UViT(core, shell)
    assert counts["core"] == sum(p.numel() for p in model.core.parameters())
    assert counts["shell"] == sum(p.numel() for p in model.shell.parameters())
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_layers_report_their_flops():
    with flop_counter() as counter:
        Linear(3, 5)(torch.zeros(4, 3))
    assert counter.flops == 2 * 4 * 3 * 5
    with flop_counter() as counter:
        Conv2d(2, 6, 3, padding=1)(torch.zeros(1, 2, 4, 4))
    assert counter.flops == 2 * (6 * 4 * 4) * (2 * 3 * 3)


def test_flop_count_matches_a_counted_forward_and_scales_with_batch():
    model = tiny_uvit("grown", 128)
    cc = model.core_config
    counts = count_flops(cc, model.shell_config)
    assert counts["total"] == model.flops_per_image() > counts["core"] > 0
    for batch in (1, 3):
        x = inputs(batch, 128, tokens=cc.text_len)
        x["text_mask"][:] = True
        with torch.no_grad(), flop_counter() as counter:
            model(**x)
        assert counter.flops == batch * counts["total"]
    # the core's cost does not depend on the image size, the shell's grows with it
    bigger = count_flops(cc, tiny_shell("grown", 256))
    assert bigger["core"] == counts["core"] and bigger["shell"] > 3 * counts["shell"]


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_uvit("grown", 64)
    randomise_zero_inits(model)
    x = inputs(2, 64)
    grads = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        model.zero_grad()
        model(**x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_bf16_autocast_and_bf16_weights_are_close_to_fp32():
    model = tiny_uvit("grown", 64)
    randomise_zero_inits(model)
    x = inputs(2, 64)
    with torch.no_grad():
        ref = model(**x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    model.to(torch.bfloat16)  # pure bf16 weights, float32 inputs
    with torch.no_grad():
        pure = model(**x)
    assert pure.dtype == torch.float32 and (pure - ref).abs().max() < 0.1 * ref.abs().max()


def test_core_traces_without_graph_breaks():
    model = tiny_uvit()
    model.set_gradient_checkpointing(True)
    x = inputs(2, 64)
    explanation = torch._dynamo.explain(model)(**x, drop_text=torch.tensor([True, False]))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("lk", [16, 7])  # self-attention, and cross-attention to 7 text tokens
def test_cpu_attention_matches_sdpa_values_and_gradients(lk):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 16, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 3, lk, 8, generator=gen, requires_grad=True) for _ in range(2))
    mask = torch.rand(2, 1, 1, lk, generator=gen) > 0.4
    mask[..., 0] = True  # every row attends to something
    grad = torch.randn(2, 3, 16, 8, generator=gen)
    results = []
    for fn in (cpu_attention, torch.nn.functional.scaled_dot_product_attention):
        out = fn(q * 8**-0.5, k, v, mask)[0] if fn is cpu_attention else fn(q, k, v, mask)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        results.append((out, dq, dk, dv))
    for ours, ref in zip(*results, strict=True):
        assert torch.allclose(ours, ref, atol=1e-5)
    low = attention(*(t.bfloat16() for t in (q, k, v)), mask)  # bf16 on CPU: cpu_attention
    assert low.dtype == torch.bfloat16 and (low.float() - results[0][0]).abs().max() < 0.03


def test_compiled_blocks_have_no_graph_breaks_and_train_like_eager():
    model = tiny_uvit("grown", 32)
    randomise_zero_inits(model)
    x = inputs(2, 32)
    grads = []
    for compiled in (False, True):
        if compiled:
            model.compile_blocks()  # fullgraph=True: a graph break would raise here
        model.zero_grad()
        model(**x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads, strict=True))
    torch._dynamo.reset()


@pytest.mark.slow  # about 20 compilations: a minute or two
def test_compiled_shell_with_more_block_shapes_than_dynamos_default_limit_runs():
    # grid 16 → 128 px: 3 encoder + 3 decoder ResBlock shapes, each trained and sampled (no
    # grad) in fp32 and bf16: beyond the 8 entries Dynamo allows a code object by default
    model = UViT(TINY, tiny_shell("grown", 128))
    model.compile_blocks()
    x = inputs(1, 128)
    model(**x).square().mean().backward()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**x)
    with torch.no_grad():
        model(**x)
    torch._dynamo.reset()


def test_shell_runs_channels_last_and_returns_contiguous_images():
    model = tiny_uvit("grown", 32)
    seen = []
    model.shell.down[0][0].register_forward_hook(lambda m, i, o: seen.append(o))
    out = model(**inputs(2, 32))
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous()


def test_unreachable_shells_raise_clear_errors():
    with pytest.raises(ValueError, match="power of two"):
        ShellConfig(kind="grown", resolution=96, grid=16, channels=(8,), blocks=(1,), norm_groups=8)
    with pytest.raises(ValueError, match="at least one level"):
        ShellConfig(kind="grown", resolution=16, grid=16, channels=(), blocks=())
    with pytest.raises(ValueError, match="reach at most"):
        shell_preset("grown", 2048, family="cpu")
    with pytest.raises(ValueError, match="one entry per level"):
        ShellConfig(kind="grown", resolution=64, grid=16, channels=(32,), blocks=(1,))
    with pytest.raises(ValueError, match="grid"):
        UViT(TINY, shell_preset("shallow", 64, family="cpu", grid=8))
    with pytest.raises(ValueError, match="z must be"):
        tiny_uvit()(**inputs(1, 128))
    with pytest.raises(ValueError, match="divisible by heads"):
        CoreConfig(width=48, heads=5)


def test_configs_round_trip_through_dicts():
    shell = SHELL_PRESETS["paper-grown-512"]
    assert ShellConfig.from_dict(json.loads(json.dumps(shell.to_dict()))) == shell
    assert CoreConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown keys"):
        CoreConfig.from_dict({**TINY.to_dict(), "widht": 3})


def test_info_json_lists_the_cpu_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--json", "--family", "cpu"])
    assert exit_info.value.code == 0
    info = json.loads(capsys.readouterr().out)
    cpu_cores = {k for k in CORE_PRESETS if k.startswith("cpu-")}
    cpu_shells = {k for k in SHELL_PRESETS if k.startswith("cpu-")}
    assert set(info["cores"]) == cpu_cores and set(info["shells"]) == cpu_shells
    rows = {(r["core"], r["shell"]): r for r in info["table"]}
    assert set(rows) == {(c, s) for c in cpu_cores for s in cpu_shells}
    tiny = rows[("cpu-tiny", "cpu-grown-512")]
    assert tiny["flops_per_image"] == tiny["core_flops"] + tiny["shell_flops"]
    assert tiny["shell_flops"] > rows[("cpu-tiny", "cpu-grown-256")]["shell_flops"]
    assert (
        tiny["core_params"]
        == count_parameters(CORE_PRESETS["cpu-tiny"], SHELL_PRESETS["cpu-grown-512"])["core"]
    )


@pytest.mark.parametrize(
    ("name", "billions"), [("paper-0.5b", 0.5), ("paper-2b", 2.0), ("paper-8b", 8.0)]
)
def test_paper_cores_have_their_nominal_size(name, billions):
    counts = count_parameters(CORE_PRESETS[name], SHELL_PRESETS["paper-grown-512"])
    assert abs(counts["core"] / 1e9 - billions) < 0.1 * billions
