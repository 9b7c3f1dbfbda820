"""Building this rank's shard of a model from the agreed plan and filling it from the checkpoint,
each parallel layer reading its own slices (``module.load(reader)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from plexus.engine.source import is_prequantized, open_checkpoint
from plexus.errors import PlexusError
from plexus.models.config import ModelConfig
from plexus.models.llama import CausalLM
from plexus.parallel.comm import Communicator
from plexus.parallel.plan import ShardPlan


def load_model(model_dir: str | Path, config: ModelConfig, plan: ShardPlan, comm: Communicator,
               max_context: int, dtype: torch.dtype, device: torch.device | str = "cpu",
               progress: Callable[[int], None] | None = None, quant: tuple[int, int] | None = None,
               quant_format=None) -> CausalLM:
    """Build this rank's shard of the model and fill it from the checkpoint.

    Every rank calls this; any rank's failure is raised on all ranks (one collective at the end).
    ``quant``: (bits, group) to quantize a dense checkpoint's layer weights as they are read
    (--quantize); ``quant_format``: a pre-quantized checkpoint's format (plexus.checkpoint.hf_quant).
    """
    model, error = None, None
    try:
        reader = open_checkpoint(model_dir, config, quant, quant_format)
        with torch.no_grad():
            model = CausalLM(config, plan, comm, max_context, dtype, device,
                             quantized=quant is not None or quant_format is not None or is_prequantized(model_dir))
            for module in model.modules():
                if hasattr(module, "load"):
                    before = reader.bytes_read
                    module.load(reader)
                    if progress is not None:
                        progress(reader.bytes_read - before)
    except PlexusError as e:
        error = str(e)
    except (OSError, RuntimeError) as e:
        error = f"{model_dir}: loading failed: {e}".splitlines()[0]
    comm.agree(error)
    model.eval()
    return model
