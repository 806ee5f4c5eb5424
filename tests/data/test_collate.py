"""MultiTaskCollator: padding, missing labels by kind, stacking and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.data import MultiTaskCollator
from lightning_mtl.kinds import IGNORE_INDEX

NAN = float("nan")
RISK = Task("risk", kind="binary")
TOPIC = Task("topic", kind="multiclass", labels=["a", "b", "c"])
FLAGS = Task("flags", kind="multilabel", labels=["f0", "f1", "f2"])
STAY = Task("stay", kind="regression")
NER = Task("ner", kind="token", labels=["O", "B", "I"])
SEG = Task("seg", kind="dense", labels=["bg", "fg"])


def nan_positions(t: torch.Tensor) -> list[bool]:
    return torch.isnan(t).tolist()


def test_missing_scalar_labels_by_kind():
    collate = MultiTaskCollator([RISK, TOPIC, STAY])
    batch = collate(
        [
            {"x": [1.0, 2.0], "risk": 1, "topic": 2, "stay": 3.5},
            {"x": [0.0, 1.0], "risk": None, "topic": None, "stay": None},
            {"x": [0.0, 0.0]},  # absent keys
            {"x": [1.0, 1.0], "risk": NAN, "topic": 0, "stay": NAN},
        ]
    )
    assert batch["x"].shape == (4, 2)
    assert batch["risk"].dtype == torch.float32 and batch["stay"].dtype == torch.float32
    assert batch["topic"].dtype == torch.long
    assert nan_positions(batch["risk"]) == [False, True, True, True] and batch["risk"][0] == 1.0
    assert batch["topic"].tolist() == [2, IGNORE_INDEX, IGNORE_INDEX, 0]
    assert nan_positions(batch["stay"]) == [False, True, True, True] and batch["stay"][0] == 3.5


def test_nan_for_an_integer_kind_becomes_minus_100():
    batch = MultiTaskCollator([TOPIC])(
        [{"x": 0.0, "topic": torch.tensor(1.0)}, {"x": 1.0, "topic": torch.tensor(NAN)}]
    )
    assert batch["topic"].dtype == torch.long and batch["topic"].tolist() == [1, IGNORE_INDEX]


def test_all_missing_labels():
    collate = MultiTaskCollator([RISK, TOPIC, FLAGS])
    batch = collate([{"x": 1.0, "risk": None, "topic": None, "flags": None}, {"x": 2.0}])
    assert batch["risk"].shape == (2,) and torch.isnan(batch["risk"]).all()
    assert batch["topic"].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert batch["flags"].shape == (2, 3) and torch.isnan(batch["flags"]).all()


def test_multilabel_rows_and_entries():
    batch = MultiTaskCollator([FLAGS])(
        [{"x": 0, "flags": [1, 0, 1]}, {"x": 1, "flags": None}, {"x": 2, "flags": [0, NAN, 1]}]
    )
    flags = batch["flags"]
    assert flags.shape == (3, 3) and flags.dtype == torch.float32
    assert flags[0].tolist() == [1.0, 0.0, 1.0]
    assert torch.isnan(flags[1]).all()
    assert flags[2, 0] == 0.0 and math.isnan(flags[2, 1]) and flags[2, 2] == 1.0


def test_all_missing_multi_output_regression_keeps_its_width():
    task = Task("r", kind="regression", num_outputs=2)
    batch = MultiTaskCollator([task])([{"x": [1.0], "r": None}, {"x": [2.0]}])
    assert batch["r"].shape == (2, 2) and torch.isnan(batch["r"]).all()
    module = MultiTaskModule(MLPBackbone(1, hidden=(4,)), [task])
    losses, _ = module.shared_step(batch, "train")  # a batch without labels for the task is weighed out
    assert float(losses["r"]) == 0.0
    assert module.task_losses(losses).present.tolist() == [False]  # and the balancers see it as absent
    losses["r"].backward()
    assert all(float(p.grad.abs().sum()) == 0.0 for p in module.parameters() if p.grad is not None)


def test_multi_output_regression_with_some_labels():
    task = Task("r", kind="regression", num_outputs=2)
    batch = MultiTaskCollator([task])([{"r": [1.0, 2.0]}, {"r": None}])
    assert batch["r"].shape == (2, 2)
    assert batch["r"][0].tolist() == [1.0, 2.0] and torch.isnan(batch["r"][1]).all()


def test_padding_of_inputs_and_token_labels():
    collate = MultiTaskCollator([NER], pad_token_id=5)
    batch = collate(
        [
            {
                "input_ids": [101, 7, 8, 102],
                "attention_mask": [1, 1, 1, 1],
                "token_type_ids": [0, 0, 0, 0],
                "ner": [-100, 1, 2, -100],
            },
            {
                "input_ids": [101, 9, 102],
                "attention_mask": [1, 1, 1],
                "token_type_ids": [0, 0, 0],
                "ner": [-100, 0, -100],
            },
            {
                "input_ids": [101, 102],
                "attention_mask": [1, 1],
                "token_type_ids": [0, 0],
                "ner": [-100, -100],
            },
        ]
    )
    assert batch["input_ids"].tolist() == [[101, 7, 8, 102], [101, 9, 102, 5], [101, 102, 5, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0] * 4] * 3
    assert batch["ner"].tolist() == [[-100, 1, 2, -100], [-100, 0, -100, -100], [-100, -100, -100, -100]]
    assert batch["ner"].dtype == torch.long


def test_special_tokens_mask_padded_with_zero():
    batch = MultiTaskCollator([], pad_token_id=3)(
        [{"input_ids": [1, 2], "special_tokens_mask": [1, 1]}, {"input_ids": [1], "special_tokens_mask": [1]}]
    )
    assert batch["special_tokens_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["input_ids"].tolist() == [[1, 2], [1, 3]]


def test_token_labels_match_input_ids_when_some_are_missing():
    collate = MultiTaskCollator([NER], pad_token_id=0)
    batch = collate(
        [{"input_ids": [101, 7, 8, 102], "ner": None}, {"input_ids": [101, 9, 102], "ner": [-100, 1, -100]}]
    )
    assert batch["ner"].shape == batch["input_ids"].shape == (2, 4)
    assert batch["ner"].tolist() == [[-100] * 4, [-100, 1, -100, -100]]


def test_dense_labels_stacked_and_missing():
    mask = [[0, 1], [1, -100]]
    batch = MultiTaskCollator([SEG])(
        [{"image": torch.zeros(1, 2, 2), "seg": mask}, {"image": torch.ones(1, 2, 2), "seg": None}]
    )
    assert batch["image"].shape == (2, 1, 2, 2)
    assert batch["seg"].dtype == torch.long and batch["seg"].shape == (2, 2, 2)
    assert batch["seg"][0].tolist() == mask and (batch["seg"][1] == IGNORE_INDEX).all()


def test_target_key_differs_from_name():
    task = Task("sentiment", kind="binary", target_key="label")
    batch = MultiTaskCollator([task])([{"x": 0.0, "label": 1}, {"x": 1.0, "label": None}])
    assert batch["label"].dtype == torch.float32 and nan_positions(batch["label"]) == [False, True]
    assert "sentiment" not in batch


def test_other_keys_stacked_or_dropped():
    batch = MultiTaskCollator([RISK])(
        [
            {"x": torch.tensor([1.0, 2.0]), "n": 3, "text": "a", "ragged": [1, 2], "partial": 1, "risk": 1},
            {"x": torch.tensor([3.0, 4.0]), "n": 4, "text": "b", "ragged": [1], "risk": 0},
        ]
    )
    assert torch.equal(batch["x"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert batch["n"].tolist() == [3, 4]
    assert set(batch) == {
        "x",
        "n",
        "risk",
    }  # strings, ragged lists and keys missing from an example are not inputs


def test_errors():
    collate = MultiTaskCollator([TOPIC, FLAGS])
    with pytest.raises(ValueError, match="Cannot collate an empty list"):
        collate([])
    with pytest.raises(TypeError, match="Each example must be a dict of inputs and labels, got list"):
        collate([[1, 2]])
    with pytest.raises(
        ValueError, match=r"Task 'flags', key 'flags': labels of different shapes \(3,\) and \(2,\)"
    ):
        collate([{"flags": [1, 0, 1]}, {"flags": [1, 0]}])
    with pytest.raises(TypeError, match="Key 'topic': cannot make a tensor of str"):
        collate([{"topic": "a"}])


# --- non-finite values ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("examples", "words"),
    [
        ([{"x": [1.0, 2.0], "stay": 1.0}, {"x": [NAN, 0.0], "stay": 2.0}], ["'x'", "row 1", "nan", "Clean"]),
        ([{"x": [1.0, 2.0], "stay": 1.0}, {"x": [0.0, 1.0], "stay": -math.inf}], ["'stay'", "row 1", "-inf"]),
    ],
)
def test_nonfinite_raises_naming_key_and_row(examples, words):
    with pytest.raises(ValueError) as info:
        MultiTaskCollator([STAY, RISK])(examples)
    for word in [*words, "nonfinite='skip'"]:
        assert word in str(info.value), (word, str(info.value))


def test_nonfinite_skip_drops_input_rows_and_masks_infinite_labels():
    collate = MultiTaskCollator([STAY, RISK], nonfinite="skip")
    examples = [
        {"x": [1.0, 2.0], "stay": 1.0, "risk": 1},
        {"x": [math.inf, 0.0], "stay": 2.0, "risk": 0},
        {"x": [3.0, 4.0], "stay": math.inf, "risk": 1},
    ]
    with pytest.warns(UserWarning, match="dropped 1 row"):
        batch = collate(examples)
    assert batch["x"].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert batch["risk"].tolist() == [1.0, 1.0]
    assert batch["stay"][0] == 1.0 and torch.isnan(batch["stay"][1])
    assert (collate.dropped_rows, collate.masked_labels) == (1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        collate(examples)
    assert (collate.dropped_rows, collate.masked_labels) == (2, 2)


def test_nonfinite_mode_is_validated():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        MultiTaskCollator([STAY], nonfinite="ignore")


def test_every_example_level_task_key_is_in_every_batch():
    batch = MultiTaskCollator([RISK, TOPIC, STAY])([{"x": 1.0}, {"x": 2.0}])
    assert torch.isnan(batch["risk"]).all() and torch.isnan(batch["stay"]).all()
    assert batch["topic"].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
