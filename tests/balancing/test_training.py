"""Every registered balancer through the stock Trainer: precisions, clipping + accumulation, resume, logging.

Parametrised over the registry (``balancer_variants``), so a newly registered method is tested here without
new test code.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import TABULAR_TASKS, DictDataset, RecordingLogger, balancer_variants, logged_keys, toy_tabular
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskModule
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.balancing import create_balancer

VARIANTS = balancer_variants()
IDS = [name + "".join(f"-{v}" for v in kw.values()) for name, kw in VARIANTS]


def build(name: str, kwargs: dict, seed: int = 0) -> MultiTaskModule:
    torch.manual_seed(seed)
    balancer = create_balancer({"name": name, **kwargs}) if kwargs else name
    return MultiTaskModule(
        MLPBackbone(8, hidden=(32, 16), dropout=0.0), TABULAR_TASKS, balancer=balancer, lr=1e-2
    )


def loader(n: int = 64, batch_size: int = 16, absent_every: int = 0) -> DataLoader:
    data = toy_tabular(n)
    if absent_every:  # the regression task lacks labels in some batches entirely
        stay = data["stay"].clone()
        stay[: n // 2] = float("nan")
        data["stay"] = stay
    return DataLoader(DictDataset(data), batch_size=batch_size, shuffle=False)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def flat_params(module: MultiTaskModule) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float() for p in module.parameters()])


PRECISIONS = {
    "32-true": {"precision": "32-true"},
    "bf16-mixed": {"precision": "bf16-mixed"},
    # CPU has no default GradScaler: inject one, so fp16 gradients are loss-scaled as on a GPU. Its initial
    # scale is lowered so that no step of these short runs overflows (and is skipped, weights unlogged);
    # the overflow path is tested in test_jacobian.py.
    "16-mixed": {
        "plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))]
    },
}


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=IDS)
def test_fp16_overflow_steps_are_skipped_without_poisoning_the_balancer_state(name, kwargs):
    module = build(name, kwargs)
    scaler = torch.amp.GradScaler("cpu")  # the GPU default 2^16: the regression loss overflows at first
    logger = RecordingLogger()
    fit = trainer(
        max_steps=8,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        logger=logger,
        log_every_n_steps=1,
    )
    fit.fit(module, loader(absent_every=2))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    for key, value in module.balancer.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"{name}: balancer state {key!r} became non-finite"
    weights = [(k, v) for _, m in logger.history for k, v in m.items() if k.startswith("weights/")]
    assert all(math.isfinite(v) for _, v in weights), weights


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=IDS)
def test_every_balancer_trains_in_every_precision(name, kwargs, precision):
    module = build(name, kwargs)
    before = flat_params(module)
    logger = RecordingLogger()
    fit = trainer(max_steps=4, logger=logger, log_every_n_steps=1, **PRECISIONS[precision])
    fit.fit(module, loader(absent_every=2))
    after = flat_params(module)
    assert fit.global_step == 4
    assert torch.isfinite(after).all()
    backbone = torch.cat([p.detach().flatten() for p in module.backbone.parameters()])
    assert not torch.equal(backbone, before[: backbone.numel()]), "the shared network did not move"
    assert len(logger.history) >= 4
    assert {f"weights/{task}" for task in module.tasks} <= logged_keys(logger)
    # the regression task has no label in the first two batches: it is logged only where it has one
    assert [("train/stay/loss" in m, "weights/stay" in m) for _, m in logger.history[:4]] == [
        (False, False)
    ] * 2 + [(True, True)] * 2
    steps = [m for _, m in logger.history if "train/loss" in m]  # the per-step entries
    assert len(steps) == 4 and all(math.isfinite(v) for m in steps for v in m.values())
    assert torch.isfinite(fit.callback_metrics["train/loss"])


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=IDS)
def test_every_balancer_with_clipping_and_accumulation(name, kwargs):
    module = build(name, kwargs)
    norms: list[float] = []

    class RecordStepGradNorm(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            def hook(optimizer, args, kwargs):
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

            trainer.optimizers[0].register_step_post_hook(hook)  # grads as the step used them

    fit = trainer(
        max_steps=3, gradient_clip_val=0.05, accumulate_grad_batches=2, callbacks=[RecordStepGradNorm()]
    )
    fit.fit(module, loader(n=96))
    assert fit.global_step == 3 and len(norms) == 3
    assert max(norms) <= 0.05 * (1 + 1e-4), norms  # clipped after aggregation, as for any loss
    assert int(module.balancer.calls) == 6  # one aggregation per micro-batch
    assert torch.isfinite(flat_params(module)).all()


STATEFUL = [(n, kw) for n, kw in VARIANTS if create_balancer({"name": n, **kw}).stateful]


@pytest.mark.parametrize(
    ("name", "kwargs"), STATEFUL, ids=[i for i, v in zip(IDS, VARIANTS) if v in STATEFUL]
)
def test_resume_continues_the_uninterrupted_trajectory(name, kwargs, tmp_path):
    data = loader(n=48)  # 3 batches an epoch
    straight = build(name, kwargs)
    trainer(max_epochs=4).fit(straight, data)

    first = build(name, kwargs)
    t1 = trainer(max_epochs=2)
    t1.fit(first, data)
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = build(name, kwargs, seed=123)  # different init: everything must come from the checkpoint
    trainer(max_epochs=4).fit(resumed, data, ckpt_path=ckpt)

    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-5, atol=1e-6)
    for key, value in straight.balancer.state_dict().items():
        torch.testing.assert_close(resumed.balancer.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert int(resumed.balancer.calls) == 12


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=IDS)
def test_spec_round_trip_through_hparams(name, kwargs, tmp_path):
    module = build(name, kwargs)
    trainer(max_steps=2).fit(module, loader())
    path = tmp_path / "m.ckpt"
    module.trainer.save_checkpoint(path)
    loaded = MultiTaskModule.load_from_checkpoint(path, weights_only=True)
    assert type(loaded.balancer) is type(module.balancer)
    assert loaded.balancer.config() == module.balancer.config()
    for key, value in module.balancer.state_dict().items():
        torch.testing.assert_close(loaded.balancer.state_dict()[key], value, msg=key)
