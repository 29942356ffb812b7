"""`Mixture`: map-style data sets drawn in proportion to weights, each item a pure function of
(seed, index) (docs/data.md, Mixtures)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from greedygrow.data.sources import skip_none_collate
from greedygrow.data.split import uniforms

SOURCE_STREAM, INDEX_STREAM = 3, 4  # `uniforms` streams (scenes' native sizes use 1 and 2)


class Mixture(Dataset):
    """Item i is item `index[i]` of `sources[source[i]]`: the source drawn with probability
    w / Σw, the index uniformly over that source, both from (seed, i). `length` items (default:
    the sources' total). Sources are map-style with `caption(i)`; an item a source cannot
    decode is ``None``, which `collate_fn` drops."""

    collate_fn = staticmethod(skip_none_collate)

    def __init__(
        self,
        sources: Sequence[Dataset],
        weights: Sequence[float],
        seed: int = 0,
        length: int | None = None,
    ) -> None:
        if not sources or len(sources) != len(weights):
            raise ValueError(
                f"a mixture needs one weight per source, got {len(sources)} sources and "
                f"{len(weights)} weights"
            )
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w) & (w > 0)):
            raise ValueError(f"mixture weights must be finite and > 0, got {list(weights)}")
        for k, d in enumerate(sources):
            if not hasattr(d, "caption"):
                raise TypeError(
                    f"mixture source {k} ({type(d).__name__}) has no caption(i): a mixture takes "
                    "map-style data sets whose captions are known (scenes with a count, folders)"
                )
            if len(d) == 0:
                raise ValueError(f"mixture source {k} ({type(d).__name__}) is empty")
        self.sources = list(sources)
        sizes = np.array([len(d) for d in sources], dtype=np.int64)
        n = int(sizes.sum()) if length is None else int(length)
        i = np.arange(n, dtype=np.int64)
        cdf = np.cumsum(w) / w.sum()
        self.source = np.searchsorted(cdf[:-1], uniforms(seed, i, SOURCE_STREAM), side="right")
        self.index = (uniforms(seed, i, INDEX_STREAM) * sizes[self.source]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        return self.sources[self.source[i]][int(self.index[i])]

    def caption(self, i: int) -> str:
        """Item i's caption, without reading its image."""
        return self.sources[self.source[i]].caption(int(self.index[i]))
