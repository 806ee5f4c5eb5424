"""``CNNEncoder``: feature shapes and widths, the spec round trip, which parameters each kind of task
trains, input errors, and a multi-task module with classification and dense heads end to end
(training, a release artifact, full-resolution class maps from ``predict``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import CNNEncoder
from lightning_mtl.hub import from_pretrained, save_pretrained


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from intra-op threads, and on a busy machine two OpenMP threads
    that wait for each other at every op make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("widths", "blocks", "decoder", "size"),
    [((8, 16, 32), 1, 4, (28, 28)), ((8, 16), 2, 6, (13, 10)), ((4, 8, 16), 1, 0, (28, 28))],
)
def test_feature_shapes_match_out_features(widths, blocks, decoder, size):
    torch.manual_seed(0)
    enc = CNNEncoder(widths=widths, blocks=blocks, decoder_channels=decoder)
    out = enc(torch.rand(3, 1, *size))
    assert set(out) == {"pooled", "spatial"}
    assert out["pooled"].shape == (3, widths[-1]) == (3, enc.out_features["pooled"])
    stride = 2 ** (len(widths) - 1)
    spatial_size = size if decoder else tuple(-(-s // stride) for s in size)
    assert out["spatial"].shape == (3, enc.out_features["spatial"], *spatial_size)
    assert enc.out_features["spatial"] == (decoder or widths[-1])
    assert sum(isinstance(m, nn.Sequential) for m in enc.stages) == len(widths) - 1
    assert len(list(enc.stages[0].children())) == blocks


def test_spec_rebuilds_the_same_architecture():
    torch.manual_seed(0)
    enc = CNNEncoder(in_channels=3, widths=(8, 16), blocks=2, decoder_channels=4, image_size=(20, 20)).eval()
    spec = enc.spec()
    assert spec["class_path"] == "lightning_mtl.backbones.CNNEncoder"
    assert spec["init_args"] == {
        "in_channels": 3,
        "widths": [8, 16],
        "blocks": 2,
        "decoder_channels": 4,
        "pool_size": 1,
        "image_size": [20, 20],
    }
    twin = CNNEncoder(**spec["init_args"]).eval()
    twin.load_state_dict(enc.state_dict())  # same tensor names and shapes
    x = torch.rand(2, 3, 20, 20)
    for key, value in enc(x).items():
        assert torch.equal(value, twin(x)[key]), key


def test_classification_trains_the_encoder_and_dense_tasks_train_the_decoder():
    torch.manual_seed(0)
    enc = CNNEncoder(widths=(4, 8), decoder_channels=4)
    enc(torch.rand(2, 1, 8, 8))["pooled"].sum().backward()
    decoder = {n for n, _ in enc.named_parameters() if n.startswith("lateral")}
    assert decoder
    for name, p in enc.named_parameters():
        assert (p.grad is None) == (name in decoder), name
    enc.zero_grad(set_to_none=True)
    enc(torch.rand(2, 1, 8, 8))["spatial"].sum().backward()
    assert all(p.grad is not None for p in enc.parameters())  # stem and every stage too
    plain = CNNEncoder(widths=(4, 8), decoder_channels=0)
    plain(torch.rand(2, 1, 8, 8))["pooled"].sum().backward()
    assert all(p.grad is not None for p in plain.parameters())  # DDP-safe for classification-only models


def test_bad_inputs_and_arguments_raise():
    enc = CNNEncoder(widths=(4, 8))
    with pytest.raises(ValueError, match=r"'image' must be a float tensor \[batch, 1, height, width\]"):
        enc(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"got torch\.float32 \(8, 8\)"):
        enc(torch.rand(8, 8))
    with pytest.raises(ValueError, match=r"got torch\.uint8 \(2, 1, 8, 8\)"):
        enc(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="positive widths"):
        CNNEncoder(widths=())
    with pytest.raises(ValueError, match="decoder_channels >= 0"):
        CNNEncoder(decoder_channels=-1)


def test_multi_task_module_learns_and_round_trips_through_an_artifact(tmp_path):
    """A toy image problem with the recipe's task layout: the class of a bright square's quadrant
    (rows: top/bottom), of its column half, and its pixel mask."""
    torch.manual_seed(0)
    n, size = 64, 12
    image = torch.zeros(n, 1, size, size)
    row, col = torch.randint(0, 2, (n,)), torch.randint(0, 2, (n,))
    mask = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        r, c = 1 + 6 * int(row[i]), 1 + 6 * int(col[i])
        image[i, 0, r : r + 4, c : c + 4] = 1.0
        mask[i, r : r + 4, c : c + 4] = 1
    tasks = [
        Task("row", kind="multiclass", labels=["top", "bottom"]),
        Task("col", kind="multiclass", labels=["left", "right"]),
        Task("square", kind="dense", labels=["background", "square"], head_kwargs={"hidden": 8}),
    ]
    module = MultiTaskModule(
        CNNEncoder(widths=(8, 16), decoder_channels=8, image_size=(size, size)), tasks, lr=1e-2
    )
    optimizer = module.configure_optimizers()
    batch = {"image": image, "row": row, "col": col, "square": mask}
    history = []
    for _ in range(40):
        losses, _ = module.shared_step(batch, "fit")
        loss = torch.stack(list(losses.values())).sum()
        history.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert history[-1] < 0.25 * history[0]
    module.eval()
    preds = module.predict(image[:5])
    assert [p["label"] for p in preds["row"]] == [["top", "bottom"][int(r)] for r in row[:5]]
    assert len(preds["square"][0]["mask"]) == size and len(preds["square"][0]["mask"][0]) == size  # per pixel
    assert (torch.tensor(preds["square"][0]["mask"]) == mask[0]).float().mean() > 0.9
    folder = save_pretrained(module, tmp_path / "toy-vision", metrics={"row": {"accuracy": 1.0}})
    restored = from_pretrained(folder)
    assert type(restored.backbone) is CNNEncoder
    assert restored.predict(image[:5]) == preds
