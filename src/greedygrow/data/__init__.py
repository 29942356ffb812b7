"""Data: the built-in scenes and real text–image readers (every item is a dict with image,
caption, key, meta)."""

from greedygrow.data.scenes import (
    ATTRIBUTES,
    COLORS,
    SHAPES,
    Scene,
    ScenesDataset,
    ScenesStream,
    native_resolution,
    native_resolutions,
    parse_caption,
    render,
    render_native,
    sample_scene,
    write_dataset,
)
from greedygrow.data.shards import WebDatasetStream
from greedygrow.data.skips import SkipCounter, skip_none_collate
from greedygrow.data.sources import FolderDataset, make_dataset

__all__ = [
    "ATTRIBUTES",
    "COLORS",
    "SHAPES",
    "FolderDataset",
    "Scene",
    "ScenesDataset",
    "ScenesStream",
    "SkipCounter",
    "WebDatasetStream",
    "make_dataset",
    "native_resolution",
    "native_resolutions",
    "parse_caption",
    "render",
    "render_native",
    "sample_scene",
    "skip_none_collate",
    "write_dataset",
]
