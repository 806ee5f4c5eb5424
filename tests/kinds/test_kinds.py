"""Task kinds: target checks, missing-label masking, post-processing and the kind registry."""

from __future__ import annotations

import pytest
import torch
from torchmetrics import Metric, MetricCollection

from lightning_mtl import Task, list_heads, list_kinds, register_kind
from lightning_mtl.heads import create_head
from lightning_mtl.kinds import IGNORE_INDEX, LOSSES, Masked, TaskKind, get_kind

NAN = float("nan")
B = 3  # batch size used throughout


def make_task(kind: str, **kwargs) -> Task:
    """A task of ``kind`` with a target key that differs from its name (so messages must name both)."""
    kwargs.setdefault("labels", ["neg", "pos"])
    return Task(f"my_{kind}", kind=kind, target_key=f"{kind}_col", **kwargs)


def head_outputs(task: Task, batch: int = B) -> torch.Tensor:
    """Outputs of the kind's default head on features of the kind's feature key (works for any kind)."""
    torch.manual_seed(0)
    hidden = 4
    shapes = {"pooled": (batch, hidden), "tokens": (batch, 5, hidden), "spatial": (batch, hidden, 3, 3)}
    features = torch.randn(*shapes.get(task.feature_key, (batch, hidden)))
    head = create_head(task.head_name, hidden, task.out_features)
    with torch.no_grad():
        return head(features)


# --- every registered kind (a new kind is covered without new test code) ------------------------------


@pytest.mark.parametrize("kind", list_kinds())
def test_kind_declares_registered_defaults(kind):
    obj = get_kind(kind)
    assert isinstance(obj, TaskKind)
    assert type(obj).registry_name == kind
    assert obj.default_head in list_heads(), f"{kind}: default head {obj.default_head!r} is not registered"
    assert obj.default_loss in LOSSES, f"{kind}: default loss {obj.default_loss!r} is not in LOSSES"
    assert isinstance(obj.feature_key, str) and obj.feature_key
    task = make_task(kind)
    assert task.head == obj.default_head and task.feature_key == obj.feature_key
    assert task.out_features >= 1


@pytest.mark.parametrize("kind", list_kinds())
def test_kind_metric_presets_build_metrics(kind):
    task = make_task(kind)
    presets = task.kind_obj.metric_presets(task)
    assert presets, f"{kind} offers no metric"
    assert all(isinstance(factory(), Metric) for factory in presets.values())
    collection = task.build_metrics()
    assert isinstance(collection, MetricCollection)
    assert set(collection.keys()) == set(presets)


@pytest.mark.parametrize("kind", list_kinds())
def test_kind_check_rejects_garbage_shape_naming_task_and_key(kind):
    task = make_task(kind)
    outputs = head_outputs(task)
    bad = torch.zeros(B + 1, 2, 3, 4, 5, dtype=task.kind_obj.target_dtype)
    with pytest.raises(ValueError, match=rf"Task 'my_{kind}', target key '{kind}_col': .*expected"):
        task.kind_obj.check(task, outputs, bad)


@pytest.mark.parametrize("kind", list_kinds())
def test_kind_postprocess_and_describe_give_one_finite_prediction_per_example(kind):
    task = make_task(kind)
    outputs = head_outputs(task)
    post = task.kind_obj.postprocess(task, outputs)
    assert post.shape[0] == B
    assert torch.isfinite(post).all()
    described = task.describe(outputs)
    assert isinstance(described, list) and len(described) == B
    assert all(isinstance(d, dict) and d for d in described)


@pytest.mark.parametrize("kind", list_kinds())
def test_register_kind_with_a_taken_name_raises(kind):
    with pytest.raises(ValueError, match="already registered"):

        @register_kind(kind)
        class Duplicate(TaskKind):
            pass

    assert type(get_kind(kind)).__name__ != "Duplicate"  # the original kind is still registered


def test_register_kind_rejects_empty_name():
    with pytest.raises(ValueError, match="non-empty string"):
        register_kind("")


def test_get_unknown_kind_lists_registered_ones():
    with pytest.raises(KeyError, match=r"Unknown task kind 'nope'.*binary"):
        get_kind("nope")


def test_list_kinds_filter():
    assert list_kinds("multi*") == ["multiclass", "multilabel"]
    assert set(list_kinds()) >= {"binary", "multiclass", "multilabel", "regression", "token", "dense"}


def test_missing_labels_error_names_the_kind():
    with pytest.raises(ValueError, match=r"Task 't' \(kind 'multiclass'\) needs `labels=\[...\]`"):
        Task("t", kind="multiclass")


# --- check: wrongly shaped targets name the task, the key and the expected shape ----------------------


def _check_error(task: Task, outputs: torch.Tensor, target: torch.Tensor) -> str:
    with pytest.raises(ValueError) as info:
        task.kind_obj.check(task, outputs, target)
    message = str(info.value)
    assert f"Task {task.name!r}" in message and f"target key {task.target_key!r}" in message
    return message


def test_binary_check():
    task = make_task("binary")
    out = torch.zeros(4, 1)
    message = _check_error(task, out, torch.zeros(4, 2))
    assert "expected shape [batch] = [4], got (4, 2)" in message
    assert "got (5,)" in _check_error(task, out, torch.zeros(5))
    assert "must be 0 or 1" in _check_error(task, out, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    # accepted: [batch], [batch, 1], missing labels as NaN or -100
    task.kind_obj.check(task, out, torch.tensor([0.0, 1.0, NAN, -100.0]))
    task.kind_obj.check(task, out, torch.tensor([[0], [1], [-100], [1]]))


def test_multiclass_check():
    task = make_task("multiclass", labels=["a", "b", "c"])
    out = torch.zeros(4, 3)
    message = _check_error(task, out, torch.zeros(4, 3, dtype=torch.long))
    assert "expected class ids of shape [batch] = [4], got (4, 3)" in message
    assert "class id 3 is out of range for 3 classes" in _check_error(task, out, torch.tensor([0, 1, 3, 2]))
    assert "expected integer class ids" in _check_error(task, out, torch.zeros(4))
    task.kind_obj.check(task, out, torch.tensor([0, 2, IGNORE_INDEX, 1]))


def test_multilabel_check():
    task = make_task("multilabel", labels=["a", "b", "c"])
    out = torch.zeros(4, 3)
    message = _check_error(task, out, torch.zeros(4, 2))
    assert "expected shape [batch, num_labels] = [4, 3], got (4, 2)" in message
    assert "must be 0 or 1" in _check_error(task, out, torch.full((4, 3), 0.5))
    task.kind_obj.check(task, out, torch.tensor([[0.0, 1.0, NAN]] * 3 + [[-100.0, 0.0, 1.0]]))


def test_regression_check():
    task = make_task("regression", labels=None)
    out = torch.zeros(4, 1)
    message = _check_error(task, out, torch.zeros(4, 2))
    assert "expected shape [batch] with batch=4, got (4, 2)" in message
    assert "got ()" in _check_error(task, out, torch.tensor(1.0))
    assert "must be floating point" in _check_error(task, out, torch.zeros(4, dtype=torch.long))
    wide = make_task("regression", labels=None, num_outputs=2)
    assert "expected shape [batch, 2] with batch=4, got (4,)" in _check_error(
        wide, torch.zeros(4, 2), torch.zeros(4)
    )
    task.kind_obj.check(task, out, torch.tensor([1.0, NAN, 3.0, 4.0]))
    wide.kind_obj.check(wide, torch.zeros(4, 2), torch.zeros(4, 2))


def test_token_check():
    task = make_task("token", labels=["O", "B", "I"])
    out = torch.zeros(2, 5, 3)
    message = _check_error(task, out, torch.zeros(2, 4, dtype=torch.long))
    assert "expected token labels of shape [batch, seq] = [2, 5], got (2, 4)" in message
    bad = torch.zeros(2, 5, dtype=torch.long)
    bad[1, 2] = 3
    assert "class id 3 is out of range for 3 classes" in _check_error(task, out, bad)
    ok = torch.full((2, 5), IGNORE_INDEX)
    ok[:, 1] = 2
    task.kind_obj.check(task, out, ok)


def test_dense_check():
    task = make_task("dense", labels=["bg", "fg"])
    out = torch.zeros(2, 2, 4, 4)
    message = _check_error(task, out, torch.zeros(2, 1, 4, 4, dtype=torch.long))
    assert "expected a class map of shape [batch, H, W] with batch=2, got (2, 1, 4, 4)" in message
    assert "got (3, 4, 4)" in _check_error(task, out, torch.zeros(3, 4, 4, dtype=torch.long))
    assert "class id 2 is out of range for 2 classes" in _check_error(task, out, torch.full((2, 4, 4), 2))
    with pytest.raises(ValueError, match=r"Task 'my_dense': a dense head must output \[batch, C, h, w\]"):
        task.kind_obj.check(task, torch.zeros(2, 2, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    task.kind_obj.check(task, out, torch.full((2, 8, 8), IGNORE_INDEX))  # a larger target map is fine


# --- mask: missing labels are dropped, the rest kept exactly ------------------------------------------


def _mask(task: Task, outputs: torch.Tensor, target: torch.Tensor) -> Masked:
    masked = task.kind_obj.mask(task, outputs, target)
    assert isinstance(masked, Masked)
    return masked


@pytest.mark.parametrize("missing", [NAN, -100.0])
def test_binary_mask_float_target(missing):
    task = make_task("binary")
    out = torch.tensor([[0.5], [-1.0], [2.0], [3.0]])
    masked = _mask(task, out, torch.tensor([1.0, missing, 0.0, missing]))
    assert masked.count == 2
    assert masked.loss_input.tolist() == [0.5, 2.0]
    assert masked.loss_target.dtype == torch.float32 and masked.loss_target.tolist() == [1.0, 0.0]
    assert masked.metric_target.dtype == torch.long and masked.metric_target.tolist() == [1, 0]
    assert torch.allclose(masked.metric_preds, torch.sigmoid(torch.tensor([0.5, 2.0])))


def test_binary_mask_integer_target():
    task = make_task("binary")
    masked = _mask(task, torch.tensor([0.1, 0.2, 0.3]), torch.tensor([IGNORE_INDEX, 1, 0]))
    assert masked.count == 2
    assert masked.loss_input.tolist() == pytest.approx([0.2, 0.3])
    assert masked.loss_target.tolist() == [1.0, 0.0]


def test_multiclass_mask():
    task = make_task("multiclass", labels=["a", "b", "c"])
    out = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    masked = _mask(task, out, torch.tensor([2, IGNORE_INDEX, 0, IGNORE_INDEX]))
    assert masked.count == 2
    assert torch.equal(masked.loss_input, out[[0, 2]])
    assert masked.loss_target.tolist() == [2, 0] and masked.loss_target.dtype == torch.long
    assert torch.equal(masked.metric_preds, out[[0, 2]]) and masked.metric_target.tolist() == [2, 0]


def test_multilabel_mask_single_entries_and_all_missing_rows():
    task = make_task("multilabel", labels=["a", "b", "c"])
    out = torch.arange(9, dtype=torch.float32).reshape(3, 3)
    target = torch.tensor([[1.0, NAN, 0.0], [NAN, NAN, NAN], [-100.0, 1.0, 1.0]])
    masked = _mask(task, out, target)
    # element-wise loss: the 4 present entries
    assert masked.loss_input.tolist() == [0.0, 2.0, 7.0, 8.0]
    assert masked.loss_target.tolist() == [1.0, 0.0, 1.0, 1.0]
    # metrics: rows with at least one label, missing entries as -100 (torchmetrics ignore_index)
    assert masked.count == 2
    assert masked.metric_target.tolist() == [[1, IGNORE_INDEX, 0], [IGNORE_INDEX, 1, 1]]
    assert torch.allclose(masked.metric_preds, torch.sigmoid(out[[0, 2]]))


def test_regression_mask_single_output():
    task = make_task("regression", labels=None)
    out = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    masked = _mask(task, out, torch.tensor([10.0, NAN, 30.0, NAN]))
    assert masked.count == 2
    assert masked.loss_input.tolist() == [1.0, 3.0] and masked.loss_target.tolist() == [10.0, 30.0]
    assert masked.metric_preds.tolist() == [1.0, 3.0] and masked.metric_target.tolist() == [10.0, 30.0]


def test_regression_mask_multi_output_keeps_partial_rows_for_the_loss_only():
    task = make_task("regression", labels=None, num_outputs=2)
    out = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    target = torch.tensor([[10.0, NAN], [30.0, 40.0], [NAN, NAN]])
    masked = _mask(task, out, target)
    assert masked.loss_input.tolist() == [1.0, 3.0, 4.0]
    assert masked.loss_target.tolist() == [10.0, 30.0, 40.0]
    assert masked.count == 1  # only the complete row reaches the metrics
    assert masked.metric_preds.tolist() == [[3.0, 4.0]] and masked.metric_target.tolist() == [[30.0, 40.0]]


def test_token_mask():
    task = make_task("token", labels=["O", "B", "I"])
    out = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    target = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX], [0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    masked = _mask(task, out, target)
    assert masked.count == 3
    assert torch.equal(masked.loss_input, torch.stack([out[0, 1], out[0, 2], out[1, 0]]))
    assert masked.loss_target.tolist() == [1, 2, 0] and masked.metric_target.tolist() == [1, 2, 0]


def test_dense_mask_same_size():
    task = make_task("dense", labels=["bg", "fg"])
    out = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2)
    target = torch.tensor([[[0, 1], [IGNORE_INDEX, 1]], [[1, 1], [0, IGNORE_INDEX]]])
    masked = _mask(task, out, target)
    assert masked.count == 6
    assert masked.loss_input.shape == (6, 2)
    assert masked.loss_target.tolist() == [0, 1, 1, 1, 1, 0]
    assert torch.equal(masked.loss_input[0], out[0, :, 0, 0]) and torch.equal(
        masked.loss_input[-1], out[1, :, 1, 0]
    )


def test_dense_mask_resizes_small_outputs_to_the_target():
    task = make_task("dense", labels=["bg", "fg"])
    out = torch.randn(2, 2, 2, 2)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, 0, 0] = IGNORE_INDEX
    masked = _mask(task, out, target)
    assert masked.count == 2 * 16 - 1
    assert masked.loss_input.shape == (31, 2)


@pytest.mark.parametrize("kind", list_kinds())
def test_all_missing_gives_zero_count(kind):
    """Any kind: a target made only of the collator's missing value is masked out entirely."""
    task = make_task(kind)
    outputs = head_outputs(task)
    examples = {
        "binary": (B,),
        "multiclass": (B,),
        "multilabel": (B, task.out_features),
        "regression": (B, task.out_features),
        "token": tuple(outputs.shape[:-1]),
        "dense": (B, *outputs.shape[-2:]),
    }
    if kind not in examples:
        pytest.skip(f"no target shape known for the kind {kind!r}")
    dtype = task.kind_obj.target_dtype
    missing = NAN if dtype.is_floating_point else IGNORE_INDEX
    masked = task.kind_obj.mask(task, outputs, torch.full(examples[kind], missing, dtype=dtype))
    assert masked.count == 0
    assert masked.loss_input.numel() == 0 and masked.loss_target.numel() == 0


# --- postprocess / describe ---------------------------------------------------------------------------


def test_binary_postprocess_and_describe():
    task = make_task("binary", labels=["ham", "spam"], threshold=0.7)
    logits = torch.tensor([[2.0], [0.0], [-3.0]])
    probs = task.kind_obj.postprocess(task, logits)
    assert torch.allclose(probs, torch.sigmoid(logits[:, 0]))
    described = task.describe(logits)
    assert [d["label"] for d in described] == ["spam", "ham", "ham"]  # 0.5 < threshold 0.7
    for d, p in zip(described, probs.tolist()):
        assert set(d["probabilities"]) == {"ham", "spam"}
        assert sum(d["probabilities"].values()) == pytest.approx(1.0)
        assert d["probabilities"]["spam"] == pytest.approx(p)
        assert d["probability"] == pytest.approx(d["probabilities"][d["label"]])  # of the predicted label


def test_binary_describe_without_labels_uses_indices():
    task = Task("b", kind="binary")
    assert task.describe(torch.tensor([[5.0]]))[0]["label"] == "1"


def test_binary_postprocess_rejects_wide_outputs():
    task = make_task("binary")
    with pytest.raises(ValueError, match=r"a binary head must output \[batch\] or \[batch, 1\]"):
        task.kind_obj.postprocess(task, torch.zeros(2, 3))


def test_multiclass_postprocess_and_describe():
    task = make_task("multiclass", labels=["news", "sport", "tech"])
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, -1.0, 0.0]])
    probs = task.kind_obj.postprocess(task, logits)
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    described = task.describe(logits)
    assert [d["label"] for d in described] == ["sport", "news"]
    for d, row in zip(described, probs.tolist()):
        assert list(d["probabilities"]) == ["news", "sport", "tech"]
        assert sum(d["probabilities"].values()) == pytest.approx(1.0)
        assert d["probability"] == pytest.approx(max(row))


def test_multilabel_postprocess_and_describe():
    task = make_task("multilabel", labels=["red", "round", "sweet"], threshold=0.5)
    logits = torch.tensor([[3.0, -3.0, 2.0], [-1.0, -1.0, -1.0]])
    probs = task.kind_obj.postprocess(task, logits)
    assert torch.allclose(probs, torch.sigmoid(logits))
    described = task.describe(logits)
    assert described[0]["labels"] == ["red", "sweet"] and described[1]["labels"] == []
    assert described[0]["probabilities"]["round"] == pytest.approx(float(torch.sigmoid(torch.tensor(-3.0))))
    assert set(described[1]["probabilities"]) == {"red", "round", "sweet"}


def test_regression_postprocess_and_describe():
    task = make_task("regression", labels=None)
    assert task.describe(torch.tensor([[4.5], [-1.0]])) == [{"value": 4.5}, {"value": -1.0}]
    named = make_task("regression", labels=["low", "high"])
    assert named.describe(torch.tensor([[1.0, 2.0]])) == [{"values": {"low": 1.0, "high": 2.0}}]
    unnamed = make_task("regression", labels=None, num_outputs=2)
    assert unnamed.describe(torch.tensor([[1.0, 2.0]])) == [{"values": {"0": 1.0, "1": 2.0}}]


def test_token_postprocess_and_describe():
    task = make_task("token", labels=["O", "B-PER", "I-PER"])
    logits = torch.tensor([[[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]]])
    probs = task.kind_obj.postprocess(task, logits)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 3))
    assert task.describe(logits) == [{"labels": ["O", "B-PER", "I-PER"]}]


def test_dense_postprocess_and_describe():
    task = make_task("dense", labels=["bg", "fg"])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 1] = 3.0
    logits[0, 0, 1, 0] = 1.0
    probs = task.kind_obj.postprocess(task, logits)
    assert torch.allclose(probs.sum(1), torch.ones(1, 2, 2))
    mask = task.describe(logits)[0]["mask"]
    assert mask[0][1] == 1 and mask[1][0] == 0


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel", "token", "dense"])
def test_probabilities_are_probabilities(kind):
    task = make_task(kind)
    post = task.kind_obj.postprocess(task, head_outputs(task) * 10)
    assert float(post.min()) >= 0.0 and float(post.max()) <= 1.0
    if kind in ("multiclass", "token", "dense"):
        dim = 1 if kind == "dense" else -1
        assert torch.allclose(post.sum(dim), torch.ones(()), atol=1e-5)


def test_missing_mask_treats_nan_and_minus_100():
    from lightning_mtl.kinds.base import missing_mask

    assert missing_mask(torch.tensor([0.0, NAN, -100.0, 1.0])).tolist() == [False, True, True, False]
    # only -100 is missing among integers: another negative id is a data error (check() names it)
    assert missing_mask(torch.tensor([0, -100, 2, -1])).tolist() == [False, True, False, False]
