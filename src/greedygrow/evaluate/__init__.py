"""Evaluation: alignment on scenes (alignment), FID / FD-DINOv2 / CMMD / CLIPScore
(distribution) on feature networks (features), one run sampled and measured (runs) and the
`greedygrow evaluate` report (report).

Names are imported lazily, so `import greedygrow.evaluate` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "alignment": (
        "Detection",
        "PromptResult",
        "Question",
        "detect",
        "make_questions",
        "scene_prompts",
        "score_image",
        "score_questions",
        "summarize",
    ),
    "distribution": (
        "Extractors",
        "FeatureStats",
        "clip_score",
        "cmmd",
        "distribution_metrics",
        "frechet_distance",
        "reference_stats",
    ),
    "features": (
        "ClipFeatures",
        "DinoV2Features",
        "FeatureExtractor",
        "InceptionFID",
        "WeightsUnavailableError",
        "load_extractor",
    ),
    "runs": ("PromptSet", "RunEvaluation", "Settings", "evaluate_run"),
    "report": ("evaluate", "write_report"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'greedygrow.evaluate' has no attribute {name!r}")
    return getattr(importlib.import_module(f"greedygrow.evaluate.{_WHERE[name]}"), name)
