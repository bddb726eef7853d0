"""Built-in models (mlp, cnn, resnet, gpt) and the `module:function` hook for user models."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from orchestrator.data import DataInfo
from orchestrator.errors import BadInput
from orchestrator.hooks import accepts, call_hook, import_hook

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec


class MLP(nn.Module):
    """Flatten, then `layers` hidden Linear-ReLU-Dropout layers, then a linear head."""

    def __init__(self, in_features: int, hidden: int, layers: int, out_features: int, dropout: float, squeeze: bool):
        super().__init__()
        parts: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(layers):
            parts += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        parts.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*parts)
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.squeeze else out


class CNN(nn.Module):
    """`layers` Conv-ReLU blocks of `hidden` channels, halving the image while it is at least 2x2, then a linear head."""

    def __init__(
        self, input_shape: tuple[int, ...], hidden: int, layers: int, out_features: int, dropout: float, squeeze: bool
    ):
        super().__init__()
        channels, h, w = input_shape
        parts: list[nn.Module] = []
        for _ in range(layers):
            parts += [nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU()]
            if h >= 2 and w >= 2:
                parts.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            parts.append(nn.Dropout(dropout))
            channels = hidden
        self.features = nn.Sequential(*parts)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(hidden * h * w, out_features))
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        return out.squeeze(-1) if self.squeeze else out


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity shortcut."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop(F.relu(self.bn1(self.conv1(x))))
        return F.relu(x + self.bn2(self.conv2(out)))


class ResNet(nn.Module):
    """A small residual net: stem, `layers` residual blocks, global average pool, linear head."""

    def __init__(
        self, input_shape: tuple[int, ...], hidden: int, layers: int, out_features: int, dropout: float, squeeze: bool
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[ResidualBlock(hidden, dropout) for _ in range(layers)])
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(hidden, out_features)
        )
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.blocks(self.stem(x)))
        return out.squeeze(-1) if self.squeeze else out


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention with a causal mask."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = (z.view(n, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(n, t, c)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer: token and learned position embeddings, causal blocks, untied head; logits (N, T, V)."""

    def __init__(self, vocab_size: int, context: int, dim: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(context, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        # Untied: safetensors refuses state dicts whose tensors share memory.
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaling of residual projections keeps the residual stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context of {self.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _outputs(info: DataInfo) -> tuple[int, bool]:
    """Width of the head and whether to squeeze it: logits per class, or one value for regression."""
    if info.task == "classification":
        return int(info.num_classes), False
    return 1, True


def build_model(spec: JobSpec, info: DataInfo, base_dir: str | Path | None = None) -> nn.Module:
    """Build the job's model for this data: a built-in by name, or a user `module:function` from base_dir."""
    m = spec.model
    if ":" in m.name:
        return _build_user_model(spec, info, base_dir)
    if m.name == "gpt":
        if info.task != "lm":
            raise BadInput(f"model.name: gpt needs token data (data.task=lm), not {info.task}")
        if info.input_shape[0] > m.context:
            raise BadInput(
                f"model.context: {m.context} is shorter than the data's sequence length {info.input_shape[0]}"
            )
        if m.hidden % m.heads:
            raise BadInput(f"model.heads: {m.heads} does not divide model.hidden={m.hidden}")
        return GPT(int(info.vocab_size), m.context, m.hidden, m.layers, m.heads, m.dropout)
    if info.task == "lm":
        raise BadInput(f"model.name: {m.name} cannot model tokens; use gpt")
    out, squeeze = _outputs(info)
    if m.name == "mlp":
        return MLP(math.prod(info.input_shape), m.hidden, m.layers, out, m.dropout, squeeze)
    if len(info.input_shape) != 3:
        raise BadInput(
            f"model.name: {m.name} needs image inputs (C, H, W); the data has inputs of shape {info.input_shape}"
        )
    if m.name == "cnn":
        return CNN(info.input_shape, m.hidden, m.layers, out, m.dropout, squeeze)
    if m.name == "resnet":
        return ResNet(info.input_shape, m.hidden, m.layers, out, m.dropout, squeeze)
    raise BadInput(f"model.name: unknown model {m.name!r}")


def _build_user_model(spec: JobSpec, info: DataInfo, base_dir) -> nn.Module:
    ref = spec.model.name
    func = import_hook(ref, base_dir, "model.name")
    kwargs = dict(spec.model.options)
    if accepts(func, "info"):
        kwargs["info"] = info
    model = call_hook(func, ref, "model.name", kwargs)
    if not isinstance(model, nn.Module):
        raise BadInput(f"model.name: {ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


# The units FSDP gathers together in a built-in model: a transformer or residual block, a layer; a GPT's
# token embedding and head too (with a large vocabulary they outweigh a block, and the root's parameters
# stay gathered from its forward to the end of its backward).
BUILTIN_BLOCKS = {
    "gpt": ["tok_emb", "TransformerBlock", "head"],
    "resnet": ["ResidualBlock"],
    "mlp": ["Linear"],
    "cnn": ["Conv2d"],
}


def block_modules(model: nn.Module, name: str, patterns: list[str]) -> list[nn.Module]:
    """The model's blocks (scaling.fsdp.blocks: module-name patterns or class names; else the built-in's), outermost first.

    ValueError naming the field when a pattern matches no module.
    """
    wanted = patterns or BUILTIN_BLOCKS.get(name, [])
    chosen: list[tuple[str, nn.Module]] = []
    matched = set()
    for module_name, module in model.named_modules():
        if not module_name:
            continue  # the root is its own unit, always
        hit = [p for p in wanted if fnmatch.fnmatchcase(module_name, p) or type(module).__name__ == p]
        if hit and not any(module_name.startswith(outer + ".") for outer, _ in chosen):
            chosen.append((module_name, module))
        matched.update(hit)
    missing = [p for p in patterns if p not in matched]
    if missing:
        raise ValueError(f"scaling.fsdp.blocks: no module of {name} matches {missing}")
    return [m for _, m in chosen]


def expected_output_shape(info: DataInfo, batch: int) -> tuple[int, ...]:
    """The output shape a model must give for `batch` examples of this data."""
    if info.task == "classification":
        return (batch, int(info.num_classes))
    if info.task == "regression":
        return (batch,)
    return (batch, info.input_shape[0], int(info.vocab_size))


def check_model(spec: JobSpec, info: DataInfo, base_dir: str | Path | None = None) -> int:
    """Preflight: build the model and run two dummy examples through it; return its parameter count or raise BadInput."""
    model = build_model(spec, info, base_dir)
    check_outputs(model, spec, info)
    return sum(p.numel() for p in model.parameters())


def check_outputs(model: nn.Module, spec: JobSpec, info: DataInfo, strict: bool = True) -> None:
    """Run two dummy examples through a built model: BadInput unless its output has the task's shape (a class count
    the data does not have would train, and score, without a word). Not `strict`: a model that cannot take the
    dummy examples (zeros of a dtype the real data may not have) passes, and meets the real data in the loop."""
    dtype = torch.long if info.task == "lm" else torch.float32
    x = torch.zeros((2,) + tuple(info.input_shape), dtype=dtype)
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # a model that cannot take this data: one line, naming the model
        if not strict:
            return
        text = str(exc).strip().splitlines()
        raise BadInput(
            f"model.name: {spec.model.name} fails on a batch of shape {tuple(x.shape)}: {type(exc).__name__}: {text[0] if text else ''}"
        ) from None
    want = expected_output_shape(info, 2)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != want and not (info.task == "regression" and got == (2, 1)):  # the loss and metrics take (N, 1) too
        raise BadInput(f"model.name: {spec.model.name} gives output {got} for a batch of 2; {info.task} needs {want}")
