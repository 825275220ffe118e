"""Lightning strategies with the few extra settings lmlab needs, usable as ``class_path`` in YAML.

- :class:`ModelParallel`: Lightning's ``ModelParallelStrategy`` (FSDP2 + tensor
  parallel) carrying the options of :func:`lmlab.distributed.parallelize.parallelize`,
  which the module's ``configure_model`` applies.
- :class:`DeepSpeedZeRO`: Lightning's ``DeepSpeedStrategy`` whose engine clips
  gradients at the module's ``gradient_clip_val``. lmlab optimises manually,
  where Lightning forbids ``trainer.gradient_clip_val``; without this the
  engine's ``gradient_clipping`` would silently be 0 (no clipping).

FSDP needs no subclass: ``lightning.pytorch.strategies.FSDPStrategy`` takes the
block class as its wrap and checkpointing policy directly from YAML.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal, Optional, Union

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

DType = Literal["bfloat16", "float16", "float32"]


class ModelParallel(ModelParallelStrategy):
    """2-D parallelism: tensor parallel within ``tensor_parallel_size`` devices, FSDP2 across replicas.

    Args:
        data_parallel_size: Number of data-parallel replicas (``auto``: the
            number of nodes).
        tensor_parallel_size: Devices sharing one copy of each block
            (``auto``: the devices of one node). Must divide n_heads and n_kv_heads.
        save_distributed_checkpoint: Save one shard per rank (a folder) instead
            of gathering full weights on rank 0.
        process_group_backend: ``nccl`` / ``gloo`` (default: by device).
        timeout: Collective timeout.
        param_dtype: FSDP2 compute dtype (``bfloat16``: bf16 matmuls, fp32
            sharded master weights; use with ``trainer.precision: 32-true``).
        reduce_dtype: Gradient reduce-scatter dtype.
        reshard_after_forward: Free gathered parameters after each block's
            forward (``False``: keep them for the backward, less communication).
        cpu_offload: Keep sharded parameters and optimizer state on the CPU.
        activation_checkpointing: Recompute blocks in the backward pass
            (``None``: keep ``model.config.activation_checkpointing``).
    """

    def __init__(
        self,
        data_parallel_size: Union[Literal["auto"], int] = "auto",
        tensor_parallel_size: Union[Literal["auto"], int] = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        param_dtype: Optional[DType] = None,
        reduce_dtype: Optional[DType] = "float32",
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        activation_checkpointing: Optional[bool] = None,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.parallelize_options: dict[str, Any] = {
            "param_dtype": param_dtype,
            "reduce_dtype": reduce_dtype,
            "reshard_after_forward": reshard_after_forward,
            "cpu_offload": cpu_offload,
            "activation_checkpointing": activation_checkpointing,
        }


class DeepSpeedZeRO(DeepSpeedStrategy):
    """DeepSpeed ZeRO whose engine clips at the module's ``gradient_clip_val``.

    Accepts every argument of Lightning's ``DeepSpeedStrategy`` (``stage``,
    ``offload_optimizer``, ``offload_parameters``, ``config``, ...).

    Args:
        gradient_clipping: Global-norm clip applied by the engine; ``None``
            takes ``model.gradient_clip_val`` (an explicit ``config`` dict's
            ``gradient_clipping`` wins over both).
    """

    def __init__(self, *args: Any, gradient_clipping: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gradient_clipping = gradient_clipping

    def setup(self, trainer) -> None:
        if isinstance(self.config, dict) and "gradient_clipping" not in self.config:
            clip = self.gradient_clipping
            if clip is None:
                clip = getattr(self.lightning_module, "gradient_clip_val", 0.0)
            self.config["gradient_clipping"] = float(clip or 0.0)
        super().setup(trainer)
