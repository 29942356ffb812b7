"""Evaluation: scenes alignment, distribution metrics, one run measured, and the report."""

from greedygrow.evaluate.alignment import (
    Detection,
    PromptResult,
    Question,
    detect,
    make_questions,
    scene_prompts,
    score_image,
    score_questions,
    summarize,
)
from greedygrow.evaluate.distribution import (
    Extractors,
    FeatureStats,
    clip_score,
    cmmd,
    distribution_metrics,
    frechet_distance,
    reference_stats,
)
from greedygrow.evaluate.features import (
    ClipFeatures,
    DinoV2Features,
    FeatureExtractor,
    InceptionFID,
    WeightsUnavailableError,
    load_extractor,
)
from greedygrow.evaluate.report import evaluate, write_report
from greedygrow.evaluate.runs import PromptSet, RunEvaluation, Settings, evaluate_run
