"""Backbones: adapters that turn a model into ``features = backbone(inputs)``.

Any ``nn.Module`` works as a backbone; adapters here add pooling, freezing, tokenisation and a
serialisable ``spec()`` so checkpoints reload without the original weights."""

from lightning_mtl.backbones.cnn import CNNEncoder
from lightning_mtl.backbones.hf_encoder import PACKAGED_MINILM, HFEncoder, resolve_model_path
from lightning_mtl.backbones.mlp import MLPBackbone
from lightning_mtl.backbones.tabular import TabularMLP

__all__ = ["PACKAGED_MINILM", "CNNEncoder", "HFEncoder", "MLPBackbone", "TabularMLP", "resolve_model_path"]
