"""The scenes alignment scorer: DSG-style questions answered by classical image analysis."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from greedygrow.data.scenes import (
    COLORS,
    HELD_OUT,
    Group,
    Scene,
    make_scene,
    native_resolutions,
    render,
    render_native,
    sample_scene,
)
from greedygrow.evaluate.alignment import (
    ATTRIBUTE_MIN_RESOLUTION,
    Detection,
    Question,
    detect,
    make_questions,
    scene_prompts,
    score_image,
    score_questions,
    summarize,
)


def accuracy_on_renders(resolution, seeds_indices, native=False):
    results = []
    for seed, index in seeds_indices:
        scene = sample_scene(seed, index)
        image = render_native(scene, resolution) if native else render(scene, resolution)
        results.append(score_image(image, scene))
    return summarize(results)


@pytest.mark.parametrize("resolution", [64, 128])
def test_scorer_answers_99_percent_of_questions_on_ground_truth_renders(resolution):
    summary = accuracy_on_renders(resolution, [(101, i) for i in range(100)])
    assert summary["questions"] >= 300
    if resolution >= ATTRIBUTE_MIN_RESOLUTION:
        assert summary["accuracy"]["attribute"] >= 0.99
    assert summary["question_accuracy"] >= 0.99, summary


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [64, 128, 256, 512])
def test_scorer_answers_99_percent_on_many_renders(resolution):
    summary = accuracy_on_renders(resolution, [(202, i) for i in range(400)])
    assert summary["question_accuracy"] >= 0.99, summary
    assert summary["all_correct"] >= 0.97, summary


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [128, 256, 512])
def test_scorer_on_high_resolution_subset_data_images(resolution):
    # data-set images (drawn at native size, then resized) whose native size is >= R
    idx = np.flatnonzero(native_resolutions(303, np.arange(50_000)) >= resolution)[:150]
    summary = accuracy_on_renders(resolution, [(303, int(i)) for i in idx], native=True)
    assert summary["question_accuracy"] >= 0.99, summary


def recolored(scene: Scene, group: int, color: str) -> Scene:
    d = scene.to_dict()
    d["groups"][group]["color"] = color
    for o in d["objects"]:
        if o["group"] == group:
            o["color"] = color
    return Scene.from_dict(d)


def without_one_object(scene: Scene, group: int) -> Scene:
    d = scene.to_dict()
    drop = next(i for i, o in enumerate(d["objects"]) if o["group"] == group)
    del d["objects"][drop]
    d["groups"][group]["count"] -= 1
    return Scene.from_dict(d)


def verdicts(result):
    return {q.text: c for q, c in zip(result.questions, result.correct, strict=True)}


def test_wrong_colour_fails_exactly_that_entitys_questions():
    scene = make_scene(
        [Group("red", "circle", "striped", 2), Group("blue", "square", "plain", 1)], seed=3
    )
    wrong = render(recolored(scene, 0, "green"), 256)
    result = score_image(wrong, scene)
    v = verdicts(result)
    assert not v["is there a red circle?"]
    assert not v["how many red circles are there?"]
    assert not v["is a red circle striped?"]  # child of a failed entity
    assert v["is there a blue square?"] and v["how many blue squares are there?"]
    assert not result.all_correct and result.score == pytest.approx(2 / 5)
    assert score_image(render(scene, 256), scene).all_correct


def test_wrong_count_fails_only_the_count_question():
    scene = make_scene(
        [Group("purple", "star", "plain", 3), Group("orange", "triangle", "dotted", 1)], seed=5
    )
    result = score_image(render(without_one_object(scene, 0), 128), scene)
    v = verdicts(result)
    assert not v["how many purple stars are there?"]
    assert (
        dict(zip([q.text for q in result.questions], result.answers, strict=True))[
            "how many purple stars are there?"
        ]
        == 2
    )
    assert v["is there a purple star?"] and v["is there a orange triangle?"]
    assert v["is a orange triangle dotted?"]


@pytest.mark.parametrize("scene_index", range(8))
def test_every_colour_swap_is_caught(scene_index):
    scene = sample_scene(404, scene_index)
    used = {g.color for g in scene.groups}
    other = next(c for c in COLORS if c not in used)
    result = score_image(render(recolored(scene, 0, other), 128), scene)
    g = scene.groups[0]
    assert not verdicts(result)[f"is there a {g.color} {g.shape}?"]


def test_attribute_questions_only_where_the_pattern_is_resolvable():
    scene = make_scene(
        [
            Group("red", "circle", "striped", 2),
            Group("red", "circle", "plain", 1),
            Group("black", "star", "outlined", 1),
        ],
        seed=1,
    )
    low = make_questions(scene, 64)
    high = make_questions(scene, ATTRIBUTE_MIN_RESOLUTION)
    assert [q.kind for q in low] == ["entity", "count", "entity", "count"]
    assert [q.text for q in high] == [
        "is there a red circle?",
        "how many red circles are there?",
        "is a red circle striped?",
        "is there a black star?",
        "how many black stars are there?",
        "is a black star outlined?",
    ]
    count = next(q for q in high if q.kind == "count")
    assert count.expected == 3 and count.parent == "e0"  # two striped + one plain red circle
    assert all(q.parent == "e0" for q in high[1:3])


def test_blurry_upsampled_patterns_are_not_credited_as_attributes():
    # a 48 px render upsampled to 256: stripes and dots are a flat tint, the outline is gone
    scene = make_scene(
        [
            Group("blue", "square", "striped", 1),
            Group("green", "circle", "dotted", 1),
            Group("orange", "square", "outlined", 1),
        ],
        seed=2,
    )
    blurry = render(scene, 48).resize((256, 256), Image.Resampling.BICUBIC)
    result = score_image(blurry, scene)
    for q, c in zip(result.questions, result.correct, strict=True):
        assert c == (q.kind != "attribute"), q.text


def test_dependencies_mark_children_of_a_wrong_parent_wrong():
    parent = Question("e0", "entity", "is there a red circle?", "red", "circle", True)
    child = Question(
        "c0", "count", "how many red circles are there?", "red", "circle", 0, parent="e0"
    )
    result = score_questions([parent, child], [])
    assert result.answers == [False, 0]
    assert result.correct == [False, False]  # the count is right on its own, but invalid
    assert result.score == 0.0 and not result.all_correct


def test_summary_counts_per_number_and_confusion_matrix():
    det = Detection(
        "red", "circle", None, (0.1, 0.1, 0.2, 0.2), 0.01, 1.0, 0.78, 0.5, 0.0, 0.0, 0.0, 0.0
    )
    results = []
    for truth_n, found_n in [(1, 1), (2, 2), (2, 1), (5, 6), (3, 0)]:
        scene = make_scene([Group("red", "circle", "plain", truth_n)], seed=0)
        results.append(score_questions(make_questions(scene, 64), [det] * found_n))
    s = summarize(results)
    assert s["count_accuracy"] == {"1": 1.0, "2": 0.5, "3": 0.0, "5": 0.0}
    m = np.array(s["count_confusion"]["matrix"])
    assert m.sum() == 5 and m[1, 1] == 1 and m[1, 2] == 1 and m[4, 6] == 1 and m[2, 0] == 1
    assert s["accuracy"]["entity"] == pytest.approx(4 / 5)
    assert s["all_correct"] == pytest.approx(2 / 5)


def test_summary_splits_held_out_pairs_from_the_other_prompts():
    red = Detection(
        "red", "circle", None, (0.1, 0.1, 0.2, 0.2), 0.01, 1.0, 0.78, 0.5, 0.0, 0.0, 0.0, 0.0
    )
    color, shape = sorted(HELD_OUT)[0]
    seen = make_scene([Group("red", "circle", "plain", 1)], seed=0)
    held = make_scene([Group(color, shape, "plain", 1)], seed=0)
    results = [
        score_questions(make_questions(seen, 64), [red]),  # right: 1.0
        score_questions(make_questions(held, 64), [red]),  # the held-out pair missed: 0.0
    ]
    s = summarize(results)
    assert s["held_out_dsg_score"] == 0.0 and s["seen_dsg_score"] == 1.0
    assert s["held_out_prompts"] == 1 and s["dsg_score"] == 0.5


def test_detect_reads_pil_arrays_and_model_tensors_alike():
    scene = sample_scene(7, 1)
    image = render(scene, 64)
    arr = np.array(image)
    tensor = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0
    a, b, c = detect(image), detect(arr), detect(tensor)
    key = lambda ds: sorted((d.color, d.shape, d.box) for d in ds)
    assert key(a) == key(b)
    assert [(x[0], x[1]) for x in key(a)] == [(x[0], x[1]) for x in key(c)]
    assert len(a) == len(scene.objects)


def test_detect_finds_nothing_on_a_plain_or_gradient_background():
    scene = sample_scene(7, 1)
    d = scene.to_dict()
    d["background"] = {
        "kind": "gradient",
        "name": "white",
        "color": [248, 248, 246],
        "color2": [220, 220, 220],
        "angle": 30.0,
    }
    d["objects"], d["groups"] = [], []
    empty = Scene.from_dict(d)
    assert detect(render(empty, 128)) == []


def test_scene_prompts_are_balanced_and_deterministic():
    scenes = scene_prompts(40)
    assert [s.caption for s in scenes] == [s.caption for s in scene_prompts(40)]
    counting = [s for i, s in enumerate(scenes) if i % 2 == 0]
    assert sorted(s.groups[0].count for s in counting) == sorted(list(range(1, 6)) * 4)
    assert len({s.caption for s in scenes}) > 30
    held = [s for i, s in enumerate(scenes) if i % 4 == 3]
    assert all((s.groups[0].color, s.groups[0].shape) in HELD_OUT for s in held)
    assert len({(s.groups[0].color, s.groups[0].shape) for s in held}) == len(HELD_OUT)


def test_detection_is_serialisable():
    result = score_image(render(sample_scene(7, 2), 128), sample_scene(7, 2))
    d = result.to_dict()
    assert d["questions"] and d["detections"]
    assert set(d["detections"][0]) == {f.name for f in dataclasses.fields(Detection)}
