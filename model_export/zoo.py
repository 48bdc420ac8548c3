"""The model zoo: the layer families devices train, one small model each, and four realistic
networks built from them. The exporter's test suite exports every one and checks its steps
against torch; the benchmarks time them; the demo federates one (``KeywordSpotter``).

Families (model: what it exercises)::

    BatchNormMLP        BatchNorm1d on features (running statistics as step state)
    DepthwiseCNN        grouped and depthwise Conv2d, BatchNorm2d, SiLU
    PoolingCNN          padded overlapping max pool, padded average pool, adaptive average pool
    ConvNormGELU        Conv2d + LayerNorm + GELU (what ORT's artifact generator failed on)
    DropoutMLP          nn.Dropout in training mode (seeded masks)
    EmbeddingBag        Embedding with a padding index over integer tokens, mean over tokens
    GRUTagger           2-layer batch-first GRU, mean over the whole output sequence
    AttentionPool       nn.MultiheadAttention and a causal F.scaled_dot_product_attention

Networks::

    TinyMobileNet       MobileNet v1 style: conv-BN-ReLU6, depthwise-separable blocks, global pool
                        (DigitsMobileNet: the same on flat digits, ``fedge demo --model``)
    KeywordSpotter      keyword spotting on MFCC frames: Conv1d-BN-ReLU, max pool, dropout
    NextWordLSTM        next-word prediction: Embedding (padding 0), 2-layer LSTM, last step
    TinyTransformer     token classifier: embedding + positions, one pre-norm encoder layer

Integer inputs are token ids in ``[0, VOCAB)``, 0 being padding. Models with dropout take
``dropout=``; the ``*_deterministic`` factories set it to 0 for exact parity tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VOCAB",
    "AttentionPool",
    "BatchNormMLP",
    "ConvNormGELU",
    "DepthwiseCNN",
    "DigitsMobileNet",
    "DropoutMLP",
    "EmbeddingBag",
    "GRUTagger",
    "KeywordSpotter",
    "NextWordLSTM",
    "PoolingCNN",
    "TinyMobileNet",
    "TinyTransformer",
    "digits_batchnorm_mlp",
    "keyword_spotter_deterministic",
    "tiny_transformer_deterministic",
]

VOCAB = 32


class BatchNormMLP(nn.Module):
    """16 -> 32 (BatchNorm1d, ReLU) -> 4 by default; input (N, in_features)."""

    def __init__(self, in_features: int = 16, hidden: int = 32, num_classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class DepthwiseCNN(nn.Module):
    """Grouped and depthwise convolutions on (N, 4, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.pointwise = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn(self.grouped(x)))
        h = F.silu(self.pointwise(self.depthwise(h)))
        return self.fc(h.flatten(1))


class PoolingCNN(nn.Module):
    """Padded/overlapping pooling and adaptive average pooling on (N, 1, 9, 9)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)  # overlapping, padded: 9 -> 5
        self.avgpool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.adaptive = nn.AdaptiveAvgPool2d((2, 2))  # 5 -> 2: uneven windows
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.avgpool(self.maxpool(torch.relu(self.conv(x))))
        return self.fc(self.adaptive(h).flatten(1))


class ConvNormGELU(nn.Module):
    """Conv2d, LayerNorm over channels and positions, GELU, on (N, 1, 6, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.LayerNorm([4, 4, 4])
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.gelu(self.norm(self.conv(x))).flatten(1))


class DropoutMLP(nn.Module):
    """64 -> 48 (ReLU, dropout) -> 10; input (N, 64)."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class EmbeddingBag(nn.Module):
    """Token ids (N, 6) -> embedding (padding 0) -> mean -> 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(dim=1))


class GRUTagger(nn.Module):
    """(N, 5, 6) features -> 2-layer batch-first GRU -> mean over the whole sequence -> 3."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 12, num_layers=2, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.fc(out.mean(dim=1))


class AttentionPool(nn.Module):
    """(N, 5, 8) -> multi-head self-attention -> causal SDPA -> mean -> 3."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 24)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x, need_weights=False)
        q, k, v = self.proj(h).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.fc(h.mean(dim=1))


def _separable(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU6(),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(),
    )


class TinyMobileNet(nn.Module):
    """MobileNet v1 in small: (N, channels, 8, 8) digits-sized images -> classes."""

    def __init__(self, channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            _separable(8, 16, 1),
            _separable(16, 32, 2),  # 8x8 -> 4x4
            _separable(32, 32, 1),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DigitsMobileNet(TinyMobileNet):
    """``TinyMobileNet`` on flat 64-pixel digits (the demo's and the fleet's data layout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, 1, 8, 8))


class KeywordSpotter(nn.Module):
    """Keyword spotting on (N, 10 MFCC coefficients, 32 frames) -> ``num_keywords`` classes."""

    def __init__(self, num_keywords: int = 4, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(10, 16, 3, padding=1),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.MaxPool1d(2),  # 32 -> 16 frames
            nn.Conv1d(16, 24, 3, padding=1),
            nn.BatchNorm1d(24),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
        )
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(24, num_keywords)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(torch.flatten(self.features(x), 1)))


class NextWordLSTM(nn.Module):
    """Next-word prediction: token ids (N, T) -> logits over the vocabulary for token T+1."""

    def __init__(self, vocab: int = VOCAB, embed: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, embed, padding_idx=0)
        self.lstm = nn.LSTM(embed, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(x))
        return self.fc(out[:, -1])


class TinyTransformer(nn.Module):
    """Token ids (N, 8) -> one pre-norm transformer encoder layer (GELU) -> mean -> classes."""

    def __init__(self, num_classes: int = 4, dropout: float = 0.1, length: int = 8) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, 16, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(1, length, 16) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(
            16,
            2,
            dim_feedforward=32,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.tokens(x) + self.positions)
        return self.head(self.norm(h).mean(dim=1))


def digits_batchnorm_mlp() -> BatchNormMLP:
    """64 digit pixels -> 32 (BatchNorm1d) -> 10: the federated batch norm tests' model."""
    return BatchNormMLP(64, 32, 10)


def keyword_spotter_deterministic() -> KeywordSpotter:
    return KeywordSpotter(dropout=0.0)


def tiny_transformer_deterministic() -> TinyTransformer:
    return TinyTransformer(dropout=0.0)
