"""`greedygrow evaluate` on a tiny untrained run writes a report that opens."""

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from greedygrow.checkpoint import export_model
from greedygrow.cli import main
from greedygrow.diffusion import schedule_for
from greedygrow.evaluate.distribution import Extractors
from greedygrow.evaluate.report import Settings, evaluate, unique_names
from greedygrow.evaluate.runs import read_prompts
from greedygrow.model import UViT, core_preset, shell_preset
from greedygrow.sample import sample_images
from greedygrow.sampling import native_bf16


def make_run(path: Path, seed: int, with_log: bool = True, **meta_items) -> Path:
    """A run folder as training writes it: exported weights (random), meta (with `meta_items`),
    loss log."""
    torch.manual_seed(seed)
    core = core_preset("cpu-tiny", width=32, depth=1, heads=2)
    model = UViT(core, shell_preset("shallow", 32, "cpu"))
    with torch.no_grad():  # zero-initialised exits make every fresh model alike: perturb
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    meta = {
        "text_encoder": "minilm",
        "text_max_length": 32,
        "resolution": 32,
        "schedule": schedule_for(32).to_dict(),
        "guidance": 2.0,
        "phase": "core",
        "mode": "scratch",
        "step": 30,
        **meta_items,
    }
    path.mkdir(parents=True)
    export_model(path, model, meta)
    if with_log:
        with (path / "metrics.jsonl").open("w") as f:
            for step in range(1, 31):
                f.write(json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-4}) + "\n")
    return path


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.text = [], 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self.tables += tag == "table"

    def handle_data(self, data):
        self.text.append(data)


def parse_report(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def decode_all(page: Page, base: Path) -> list[Image.Image]:
    out = []
    for src in page.images:
        if src.startswith("data:image/png;base64,"):
            img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        else:
            img = Image.open(base / src)
        img.load()
        out.append(img)
    return out


def test_evaluate_cli_on_a_tiny_run_writes_a_report_that_opens(tmp_path):
    run = make_run(tmp_path / "tiny", seed=0)
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as done:
        main(
            [
                "evaluate",
                "--model",
                str(run),
                "--out",
                str(out),
                "--count",
                "6",
                "--seeds",
                "0",
                "1",
                "--steps",
                "2",
                "--sampler",
                "ddim",
                "--no-distribution",
            ]
        )
    assert done.value.code == 0
    page = parse_report(out / "report.html")
    images = decode_all(page, out)
    assert page.tables >= 2
    assert len(images) == 3 + 6 * 2  # alignment, confusion, loss plots + every sample
    assert all(img.width > 0 for img in images)
    text = " ".join(page.text)
    assert "DSG score" in text and "Training loss" in text
    metrics = json.loads((out / "metrics.json").read_text())
    run_metrics = metrics["runs"][0]
    assert len(run_metrics["samples"]) == 12 and run_metrics["settings"]["guidance"] == 2.0
    summary = run_metrics["alignment"]
    assert summary["prompts"] == 12 and 0 <= summary["dsg_score"] <= 1
    assert set(summary["count_accuracy"]) <= {"1", "2", "3", "4", "5"}
    for s in run_metrics["samples"]:
        assert Image.open(out / s["file"]).size == (32, 32)
    assert "not requested" in run_metrics["distribution_missing"]["all"]


def test_evaluate_compares_runs_with_distribution_metrics_and_prompt_file(tmp_path):
    from test_distribution import TinyConvFeatures, tiny_clip

    a = make_run(tmp_path / "a" / "run", seed=0)
    b = make_run(tmp_path / "b" / "run", seed=1, with_log=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# scene captions are scored, others only get distribution metrics\n"
        "two red circles\na photo of a cat\n\nan outlined blue square\n"
    )
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 48), (40 * i, 200, 100)).save(refs / f"{i}.png")
    (refs / "broken.png").write_bytes(b"not a png")
    ext = Extractors(inception=TinyConvFeatures(), clip=tiny_clip(), notes={"dinov2": "none"})
    settings = Settings(sampler="ddim", steps=2, seeds=(3, 4), resolution=48)
    with pytest.warns(UserWarning, match="skipped 1 undecodable"):
        paths = evaluate(
            a,
            tmp_path / "out",
            [b],
            str(prompts),
            references=str(refs),
            settings=settings,
            extractors=ext,
            cache_dir=tmp_path / "cache",
            progress=None,
        )
    metrics = json.loads(paths["metrics"].read_text())
    assert [r["name"] for r in metrics["runs"]] == ["a-run", "b-run"]
    for r in metrics["runs"]:
        assert set(r["distribution"]) == {"fid", "cmmd", "clip_score"}
        assert r["alignment"]["prompts"] == 4  # 2 scene prompts × 2 seeds
        assert r["settings"]["resolution"] == 48
    assert metrics["runs"][0]["distribution"] != metrics["runs"][1]["distribution"]
    scored = [s for s in metrics["runs"][0]["samples"] if "score" in s]
    assert {s["prompt"] for s in scored} == {0, 2}
    page = parse_report(paths["report"])
    images = decode_all(page, paths["report"].parent)
    assert len(images) == 3 + 2 * 3 * 2  # 2 runs × 3 prompts × 2 seeds, plus three plots
    assert "a-run" in " ".join(page.text) and "b-run" in " ".join(page.text)
    assert "biased upwards at small N" in " ".join(page.text)  # 8 images per run, not 10k
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # cached once, reused


def test_compare_shows_each_runs_core_drift_from_its_meta_or_log_and_a_dash_otherwise(tmp_path):
    joint = make_run(tmp_path / "joint", seed=0, phase="grow", mode="joint", core_drift=0.25)
    unfreeze = make_run(tmp_path / "unfreeze", seed=1, phase="grow", mode="unfreeze")
    with (unfreeze / "metrics.jsonl").open("a") as f:  # a run exported before drift was stored
        f.write(json.dumps({"step": 31, "loss": 0.1, "core_drift": 0.125}) + "\n")
    core = make_run(tmp_path / "core", seed=2)
    settings = Settings(sampler="ddim", steps=1, seeds=(0,))
    paths = evaluate(
        joint, tmp_path / "out", [unfreeze, core], count=1, settings=settings, progress=None
    )
    metrics = json.loads(paths["metrics"].read_text())
    assert [r["core_drift"] for r in metrics["runs"]] == [0.25, 0.125, None]
    rows = paths["report"].read_text(encoding="utf-8").split("<tr>")
    (drift,) = [r for r in rows if "core drift from phase 1" in r]
    assert [c.split("<")[0] for c in drift.split("<td>")[1:]] == ["0.250", "0.125", "—"]


def test_evaluate_reports_a_missing_run_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "o"),
                "--no-distribution",
                "--count",
                "2",
            ]
        )
    assert done.value.code == 2
    assert "nope: no such run folder or .safetensors file" in capsys.readouterr().err


def test_prompt_file_parses_scene_captions(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("three striped yellow stars\n# comment\na dog\nsix red circles\n")
    prompts = read_prompts(f)
    assert prompts.captions == ["three striped yellow stars", "a dog", "six red circles"]
    assert prompts.scenes[0].groups[0].count == 3 and prompts.scenes[1] is None
    assert prompts.scenes[2] is None  # six is not a scenes count: no ground truth


def test_settings_reject_bad_seeds_and_sizes():
    for bad in (
        dict(seeds=()),
        dict(seeds=(1, 1)),
        dict(seeds=(-1,)),
        dict(seeds=(10_000,)),
        dict(steps=0),
        dict(resolution=8),
    ):
        with pytest.raises(ValueError):
            Settings(**bad)


def test_run_names_are_distinct():
    assert unique_names(["x/run", "y/run", "z/other"]) == ["x-run", "y-run", "other"]
    assert unique_names(["x/run", "x/run"]) == ["x-run-0", "x-run-1"]


def test_sampling_draws_equal_batches_of_mixed_prompts_and_the_batch_does_not_change_images(
    tmp_path, monkeypatch
):
    import greedygrow.evaluate.runs as runs

    run = make_run(tmp_path / "run", seed=0)
    captions = [f"{n} red circles" for n in ("two", "three", "four", "five", "six")]
    sizes = []

    def recording(model, text, schedule, seeds, **kw):
        sizes.append(len(seeds))
        assert len(text) == len(seeds)
        return sample_images(model, text, schedule, seeds, **kw)

    monkeypatch.setattr(runs, "sample_images", recording)
    kw = dict(sampler="ddim", steps=2, seeds=(0, 1, 2), bf16=False)
    big, prompt_of, seeds, _ = runs.sample_prompts(run, captions, Settings(batch_size=4, **kw))
    assert sizes == [4, 4, 4, 3]  # 15 images in ⌈15/4⌉ batches of equal size (±1)
    assert prompt_of == [p for p in range(5) for _ in range(3)]
    assert seeds == [10_000 * p + s for p in range(5) for s in (0, 1, 2)]
    one, *_ = runs.sample_prompts(run, captions, Settings(batch_size=15, **kw))
    assert sizes[4:] == [15]
    assert (big.int() - one.int()).abs().max() <= 1  # float round-off may flip one level


def test_bf16_default_follows_the_device_and_reaches_the_sampler(tmp_path):
    run = make_run(tmp_path / "run", seed=0)
    used, images = {}, {}
    for flag in ("--bf16", "--no-bf16", None):
        out = tmp_path / str(flag)
        args = ["evaluate", "--model", str(run), "--out", str(out), "--count", "2"]
        args += ["--seeds", "0", "--steps", "2", "--no-distribution"]
        with pytest.raises(SystemExit):
            main(args + ([flag] if flag else []))
        metrics = json.loads((out / "metrics.json").read_text())
        used[flag] = metrics["runs"][0]["settings"]["bf16"]
        files = [out / s["file"] for s in metrics["runs"][0]["samples"]]
        images[flag] = [np.asarray(Image.open(f)) for f in files]
    assert used == {"--bf16": True, "--no-bf16": False, None: native_bf16("cpu")}
    bf16, fp32 = np.stack(images["--bf16"]), np.stack(images["--no-bf16"])
    assert (bf16 != fp32).any()
    assert (np.stack(images[None]) == (bf16 if native_bf16("cpu") else fp32)).all()


def test_steps_default_to_25_for_dpmpp2m_and_50_for_first_order_samplers(tmp_path):
    run = make_run(tmp_path / "run", seed=0)
    steps = {}
    for sampler in ("dpmpp2m", "ddim"):
        out = tmp_path / sampler
        args = ["evaluate", "--model", str(run), "--out", str(out), "--sampler", sampler]
        with pytest.raises(SystemExit):
            main([*args, "--count", "1", "--seeds", "0", "--no-distribution"])
        steps[sampler] = json.loads((out / "metrics.json").read_text())["runs"][0]["settings"]
    assert {k: v["steps"] for k, v in steps.items()} == {"dpmpp2m": 25, "ddim": 50}


def test_report_shows_alignment_against_each_models_training_flops(tmp_path):
    cost = {"images": 640, "train_flops": 3.2e12, "wall_s": 7200.0, "cpu_s": 14000.0}
    small = make_run(tmp_path / "small", seed=0, compute={"phase": cost, "total": cost})
    big_cost = {k: 10 * v for k, v in cost.items()}
    big = make_run(tmp_path / "big", seed=1, compute={"phase": cost, "total": big_cost})
    unknown = make_run(tmp_path / "unknown", seed=2)  # exported before compute was recorded
    settings = Settings(sampler="ddim", steps=2, seeds=(0,), batch_size=4)
    paths = evaluate(small, tmp_path / "out", [big, unknown], None, 4, settings=settings)
    runs = {r["name"]: r for r in json.loads(paths["metrics"].read_text())["runs"]}
    assert runs["big"]["train_cost"]["train_flops"] == 3.2e13  # the total over its phases
    assert runs["small"]["train_cost"] == cost and runs["unknown"]["train_cost"] is None
    page = parse_report(paths["report"])
    text = " ".join(page.text)
    assert "Alignment against training compute" in text and "3.2e+13" in text
    assert "training wall hours, all phases" in text and "20.00" in text
