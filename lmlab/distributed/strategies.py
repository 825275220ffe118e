"""Lightning strategies with the few extra settings lmlab needs, usable as ``class_path`` in YAML.

- :class:`ModelParallel`: Lightning's ``ModelParallelStrategy`` (FSDP2 + tensor
  parallel) carrying the options of :func:`lmlab.distributed.parallelize.parallelize`,
  which the module's ``configure_model`` applies.
- :class:`DeepSpeedZeRO`: Lightning's ``DeepSpeedStrategy`` whose engine clips
  gradients at the module's ``gradient_clip_val``. lmlab optimises manually,
  where Lightning forbids ``trainer.gradient_clip_val``; without this the
  engine's ``gradient_clipping`` would silently be 0 (no clipping). It also
  runs on CPUs (gloo), so ZeRO configs are tested without a GPU.

FSDP needs no subclass: ``lightning.pytorch.strategies.FSDPStrategy`` takes the
block class as its wrap and checkpointing policy directly from YAML. It needs
CUDA (torch's FSDP1 refuses CPUs); on CPUs, :class:`ModelParallel` with
``tensor_parallel_size: 1`` is FSDP2 over gloo.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Generator, Literal, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

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

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        # checkpoints hold the Adam moments of fused q/k/v and gate/up rows in canonical order,
        # like the weights, so they resume at any TP degree; the live state keeps its layout
        from lightning.pytorch.core.optimizer import LightningOptimizer

        from lmlab.distributed.parallelize import fused_row_permutations, permute_optimizer_rows

        opt = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        perms = fused_row_permutations(self.model) if self.model is not None else {}
        live = {p: dict(opt.state[p]) for p in perms if p in opt.state}
        permute_optimizer_rows(opt, perms, to_canonical=True)
        try:
            return super().optimizer_state(optimizer)
        finally:
            for p, state in live.items():
                opt.state[p].update(state)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        from lmlab.distributed.parallelize import fused_row_permutations, permute_optimizer_rows

        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        perms = fused_row_permutations(self.model) if self.model is not None else {}
        for opt in self.optimizers:
            permute_optimizer_rows(opt, perms, to_canonical=False)
        return checkpoint


class DeepSpeedZeRO(DeepSpeedStrategy):
    """DeepSpeed ZeRO whose engine clips at the module's ``gradient_clip_val``; also runs on CPUs.

    Accepts every argument of Lightning's ``DeepSpeedStrategy`` (``stage``,
    ``offload_optimizer``, ``offload_parameters``, ``config``, ...).

    With ``trainer.accelerator: cpu`` the same engine and ZeRO partitioning run
    over gloo on DeepSpeed's CPU accelerator (Lightning's own class stops on
    anything but CUDA): slow, but it lets a laptop or CI check a ZeRO config's
    numerics before a cluster job.

    Args:
        gradient_clipping: Global-norm clip applied by the engine; ``None``
            takes ``model.settings.gradient_clip_val`` (an explicit ``config`` dict's
            ``gradient_clipping`` wins over both).
    """

    def __init__(self, *args: Any, gradient_clipping: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gradient_clipping = gradient_clipping

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        if device.type == "cpu" and device.index is None:
            # the engine reads the device index as this process's rank on the node
            return torch.device("cpu", self.local_rank)
        return device

    def setup_environment(self) -> None:
        if not self._on_cpu:
            return super().setup_environment()
        # skip only DeepSpeedStrategy's CUDA check; the rest is DDP's (process group, device)
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            return super().setup_distributed()
        # the CUDA path also checks GPU indices against local ranks, which CPUs do not have
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _fill_lmlab_config(self) -> None:
        # Lightning formats the config once, on first use (model_sharded_context runs before
        # setup); both keys must be in place by then or it fills them with values that are
        # wrong for lmlab: clipping 0 (manual optimisation hides trainer.gradient_clip_val) and
        # a micro-batch read from a batch_sampler lmlab's step-batch loaders do not have.
        if not isinstance(self.config, dict) or self.lightning_module is None:
            return
        if "gradient_clipping" not in self.config:
            clip = self.gradient_clipping
            if clip is None:
                clip = getattr(self.lightning_module, "gradient_clip_val", 0.0)
            self.config["gradient_clipping"] = float(clip or 0.0)
        if "train_micro_batch_size_per_gpu" not in self.config:
            trainer = getattr(self.lightning_module, "_trainer", None)
            micro = getattr(getattr(trainer, "datamodule", None), "micro_batch_size", None)
            self.config["train_micro_batch_size_per_gpu"] = int(micro or 1)  # throughput logs only

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        self._fill_lmlab_config()
        with super().model_sharded_context():
            yield

    def setup(self, trainer) -> None:
        self._fill_lmlab_config()
        super().setup(trainer)
