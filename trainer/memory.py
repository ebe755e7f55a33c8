"""How much memory training a model takes, estimated from its spec before anything is built.

The tables of a wide & deep model grow with sizes the config and the data decide: the wide
tower has one weight per vocabulary token, quantile and hash bucket of a cross, the deep tower
an embedding row per vocabulary token. Each weight also has its optimizer's slots, and the
trainer holds a copy of the weights for evaluation and export. A table too large for the
machine would end the run in an out-of-memory error deep inside TensorFlow; checked first, it
ends in one line naming the config key to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import TrainError
from trainer.spec import ModelSpec, Role
from transform.config import Config

FLOAT_BYTES = 4
OPTIMIZER_SLOTS = {"ftrl": 2, "adagrad": 1, "adam": 2, "sgd": 0}
"""Variables each optimizer keeps per weight (accumulators, moments)."""
WEIGHT_COPIES = 2
"""Copies of the weights besides the trained ones: the evaluation and export model, and the
arrays that carry the weights over to it."""
ACTIVATION_COPIES = 3
"""A batch's activations are kept for the backward pass, with their gradients."""


@dataclass(frozen=True)
class Part:
    """One table or layer group of the model and the config key that sizes it."""

    key: str
    description: str
    parameters: int
    bytes: int


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory a training run takes, by part; `total` in bytes."""

    parts: tuple[Part, ...]
    activations: int

    @property
    def parameters(self) -> int:
        """Weights of the model."""
        return sum(part.parameters for part in self.parts)

    @property
    def total(self) -> int:
        """Bytes of the weights, their optimizer slots and copies, and a batch's activations."""
        return sum(part.bytes for part in self.parts) + self.activations

    @property
    def largest(self) -> Part:
        """The part that takes the most memory."""
        return max(self.parts, key=lambda part: part.bytes)


def estimate(spec: ModelSpec, config: Config) -> MemoryEstimate:
    """The memory training a model of this spec with this config's optimizers takes."""
    m = config.model
    wide_bytes = FLOAT_BYTES * (1 + OPTIMIZER_SLOTS.get(m.wide_optimizer.name, 2) + WEIGHT_COPIES)
    deep_bytes = FLOAT_BYTES * (1 + OPTIMIZER_SLOTS.get(m.deep_optimizer.name, 2) + WEIGHT_COPIES)
    parts: list[Part] = []
    for i in spec.wide_inputs:
        if i.role is Role.CROSS:
            key, what = f"crosses.{i.name}.hash_buckets", f"{i.size:,} hash buckets"
        elif i.role is Role.NUMERIC:
            key, what = f"features.{i.name}.quantiles", f"{i.size:,} quantiles"
        else:
            key = f"features.{i.name}"
            what = f"vocabulary {i.vocabulary!r} of {i.size:,} tokens"
        parts.append(Part(key, f"wide weights of {what}", i.size, i.size * wide_bytes))
    width = 0
    tables: set[str] = set()
    for i in spec.deep_inputs:
        if i.role is Role.NUMERIC:
            width += 1
            continue
        width += i.embedding_dim
        if i.vocabulary in tables:
            continue  # features that share a vocabulary share its embedding table
        tables.add(i.vocabulary)
        count = i.size * i.embedding_dim
        dim_key = (
            f"features.{i.name}.embedding_dim"
            if config.feature(i.name).embedding_dim
            else "model.embedding_dim"
        )
        parts.append(
            Part(
                dim_key,
                f"embeddings of {i.vocabulary}: {i.size:,} tokens x {i.embedding_dim}",
                count,
                count * deep_bytes,
            )
        )
    # b of equation 3, one for the whole model.
    parts.append(Part("model", "the bias", 1, wide_bytes))
    layers = 0
    activations = 0
    if spec.deep_inputs:
        previous = width
        for units in spec.hidden_units:
            layers += previous * units + units
            previous = units
        layers += previous  # w_deep of equation 3, without a bias of its own
        activations = (
            config.training.batch_size
            * (width + sum(spec.hidden_units))
            * FLOAT_BYTES
            * ACTIVATION_COPIES
        )
        parts.append(
            Part(
                "model.hidden_units",
                f"ReLU layers {list(spec.hidden_units)} on {width} inputs",
                layers,
                layers * deep_bytes,
            )
        )
    return MemoryEstimate(tuple(parts), activations)


def available_memory() -> int:
    """Bytes this process may still allocate: the machine's available memory, or less when
    a cgroup (a container) limits the process."""
    import psutil

    available = psutil.virtual_memory().available
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What a cgroup v2 memory limit leaves, if one applies."""
    try:
        limit = (root / "memory.max").read_text().strip()
        current = int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit():
        return None
    return max(0, int(limit) - current)


def check_fits(memory: MemoryEstimate, available: int) -> None:
    """Refuses a model whose training needs more memory than is available.

    Raises:
      TrainError: naming the estimate, the memory available and the config key of the
        largest part.
    """
    if memory.total <= available:
        return
    largest = memory.largest
    raise TrainError(
        f"{largest.key}: the model needs about {format_bytes(memory.total)} of memory to train "
        f"({memory.parameters:,} weights), more than the {format_bytes(available)} available; "
        f"its largest part, {largest.description}, takes {format_bytes(largest.bytes)}: make it "
        "smaller"
    )


def format_bytes(count: float) -> str:
    """Bytes as a short human-readable size (1.5 GiB)."""
    if count < 1024:
        return f"{count:.0f} B"
    exponent = min(int(math.log(count, 1024)), 6)
    unit = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")[exponent]
    return f"{count / 1024**exponent:.1f} {unit}"


def describe(memory: MemoryEstimate, available: int) -> str:
    """One line for the start of a training run."""
    return (
        f"model: {memory.parameters:,} weights; training needs about "
        f"{format_bytes(memory.total)} of memory ({format_bytes(available)} available)"
    )
