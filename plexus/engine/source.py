"""What ``--model`` names: a Hugging Face directory (config.json + safetensors) or a GGUF file
(``file.gguf``, or a directory holding one .gguf and no config.json). Every command reads the
config, the checkpoint and the tokenizer through here, so each works on both."""

from __future__ import annotations

from pathlib import Path

from plexus.checkpoint.gguf import GGUFCheckpoint, find_gguf, gguf_config
from plexus.checkpoint.reader import CheckpointReader
from plexus.models.config import ModelConfig


def gguf_source(model: str | Path) -> Path | None:
    """The GGUF file ``model`` stands for, or None for a Hugging Face directory (a directory
    with a config.json is one, whatever else it holds)."""
    p = Path(model)
    if p.is_dir() and (p / "config.json").is_file():
        return None
    return find_gguf(p)


def load_config(model: str | Path) -> ModelConfig:
    """The model's configuration: config.json, or a GGUF file's metadata."""
    gguf = gguf_source(model)
    if gguf is None:
        return ModelConfig.from_dir(model)
    return ModelConfig.from_dict(gguf_config(gguf), str(gguf))


def open_checkpoint(model: str | Path, config: ModelConfig, quant: tuple[int, int] | None = None,
                    quant_format=None) -> "CheckpointReader | GGUFCheckpoint":
    """The reader of ``model``'s tensors (the same interface for both kinds)."""
    gguf = gguf_source(model)
    if gguf is None:
        return CheckpointReader(model, config, quant, quant_format)
    return GGUFCheckpoint(gguf, config, quant)


def is_prequantized(model: str | Path) -> bool:
    """True for a GGUF file: its linear weights may come out of the reader as QuantWeights
    (build the model ``quantized``)."""
    return gguf_source(model) is not None
