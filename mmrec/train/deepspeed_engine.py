"""The DeepSpeed engine: the same interface as TorchEngine, with the model under deepspeed.initialize.

ZeRO 0-3, optimizer offload (DeepSpeedCPUAdam) and parameter offload come from [engine]; batch
geometry, clipping and the optimizer's hyper-parameters from [train], so the DeepSpeed JSON holds no
free-standing knob. The optimizer is built by us (the same parameter groups as the torch engine) and
the loop sets each group's lr every step (no DeepSpeed scheduler). Mixed precision is torch.autocast
around the forward, with fp32 weights, as in the torch engine, so the two engines agree.

Checkpoints: DeepSpeed's own files per rank under checkpoint/engine/, plus the frozen parameters
exact in fp32 (DeepSpeed issues 3090, 6771, 4055 lose or round frozen parameters through a reload;
they are restored from there after loading). A checkpoint written at another world size under ZeRO
1-3 loads through DeepSpeed's universal format (an elastic restart).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from core.config import Config
from mmrec.train.checkpoint import ENGINE_DIR, FROZEN_FILE, ResumePoint
from mmrec.train.engine import Engine
from mmrec.train.stage_setup import StageSetup

UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def deepspeed_config(cfg: Config, world_size: int, *, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON of a job at `world_size`, derived from the config tree."""
    zero: dict[str, Any] = {"stage": cfg.engine.zero_stage}
    if cfg.engine.zero_stage >= 1:
        # Overlapping the gradient reduction with backward needs CUDA streams; on CPU it only adds copies.
        zero.update(contiguous_gradients=True, overlap_comm=cfg.scaling.use_gpu, reduce_bucket_size=50_000_000)
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if cfg.engine.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if cfg.engine.zero_stage == 3:
        # The export is fp32 from the optimizer's master weights; a 16-bit copy in every checkpoint is waste.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps_for(world_size),
        "gradient_clipping": float(cfg.train.grad_clip),  # 0 means no clipping, for DeepSpeed too
        "bf16": {"enabled": False},  # precision is autocast around the forward, fp32 weights (see above)
        "fp16": {"enabled": False},  # fp16 needs loss scaling and is refused on CPU
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW with named parameter groups
        "steps_per_print": 10**9,  # the loop logs
        "wall_clock_breakdown": False,
    }
    if cfg.engine.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = True  # DeepSpeedCPUAdam is what we construct
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


class _Gathered:
    """deepspeed.zero.GatheredParameters under ZeRO-3 (rank 0 modifies, then broadcasts), nothing otherwise."""

    def __init__(self, params: list, zero_stage: int) -> None:
        self.context = None
        if zero_stage == 3 and params:
            import deepspeed

            self.context = deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    def __enter__(self) -> None:
        if self.context is not None:
            self.context.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.context is not None:
            self.context.__exit__(*exc)


class DeepSpeedEngine(Engine):
    kind = "deepspeed"

    def __init__(self, setup: StageSetup, cfg: Config, *, rank: int, world_size: int, device: torch.device,
                 autocast_dtype: torch.dtype | None, scratch: Path, log, lr_scale: float = 1.0,
                 resume: ResumePoint | None = None) -> None:
        import deepspeed

        super().__init__(setup, cfg.train, grad_accum=cfg.grad_accum_steps_for(world_size), device=device,
                         autocast_dtype=autocast_dtype)
        self.job, self.rank, self.world_size = cfg, rank, world_size
        self.zero_stage = cfg.engine.zero_stage
        setup.model.to(device)
        self.frozen = {n: p.detach().clone().cpu() for n, p in setup.model.named_parameters() if not p.requires_grad}
        groups = setup.param_groups(cfg.train, lr_scale)
        self.peak_lr = max(group["peak_lr"] for group in groups)
        betas, weight_decay = tuple(cfg.train.betas), cfg.train.weight_decay
        if cfg.engine.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=cfg.train.lr * lr_scale, betas=betas, weight_decay=weight_decay,
                                         adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr * lr_scale, betas=betas, weight_decay=weight_decay)
        universal = None
        info = resume.info if resume is not None else None
        if info is not None and info["world_size"] != world_size and self.zero_stage > 0:
            log(f"world size changed {info['world_size']} -> {world_size}: loading through a universal checkpoint")
            universal = self._to_universal(resume, scratch / "universal")
        self.engine, _, _, _ = deepspeed.initialize(
            model=setup.model, optimizer=optimizer,
            config=deepspeed_config(cfg, world_size, load_universal=universal is not None),
        )
        self.module = self.engine.module
        if info is not None:
            wanted = [{k: g[k] for k in ("peak_lr", "lr", "betas", "weight_decay")} for g in self.engine.optimizer.param_groups]
            load_dir = universal or resume.directory / ENGINE_DIR
            path, _ = self.engine.load_checkpoint(str(load_dir), tag=info["engine_tag"], load_module_strict=False,
                                                  load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint {info['engine_tag']} in {load_dir}")
            for group, values in zip(self.engine.optimizer.param_groups, wanted):  # this run's config wins
                group.update(values)
            if self.frozen:
                self._restore_frozen(resume.directory / FROZEN_FILE)

    # ---- checkpoints ----

    @staticmethod
    def _to_universal(resume: ResumePoint, out: Path) -> Path:
        """Convert a ZeRO checkpoint (one optimizer partition per rank) to DeepSpeed's universal format."""
        tag = resume.info["engine_tag"]
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
             str(resume.directory / ENGINE_DIR / tag), "--output_folder", str(out / tag),
             "--num_extract_workers", "1", "--num_merge_workers", "1"],
            check=True, stdout=subprocess.DEVNULL,
        )
        (out / "latest_universal").write_text(tag)
        return out

    def _restore_frozen(self, path: Path) -> None:
        from safetensors.torch import load_file

        saved = load_file(str(path))
        if set(saved) != set(self.frozen):
            raise RuntimeError(f"{path} does not hold the frozen parameters of this stage")
        self.frozen = saved
        named = [(n, p) for n, p in self.module.named_parameters() if n in saved]
        with _Gathered([p for _, p in named], self.zero_stage):
            if self.rank == 0 or self.zero_stage < 3:
                with torch.no_grad():
                    for name, param in named:
                        param.data.copy_(saved[name].to(param.dtype))

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tag = self.tag
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=UNIVERSAL_INFO)
        if self.rank == 0 and self.frozen:
            save_file({n: t.contiguous() for n, t in self.frozen.items()}, str(directory.parent / FROZEN_FILE))

    @property
    def tag(self) -> str:
        return "state"  # one tag per checkpoint directory; the directory name carries the step

    # ---- the step ----

    def forward_backward(self, ids: torch.Tensor, *, poison: bool = False) -> torch.Tensor:
        loss = self._loss(lambda x: self.engine(x, **self.setup.path_kwargs)[0], ids, poison)
        self.engine.backward(loss)  # DeepSpeed scales by 1 / gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # bookkeeping only; the boundary step is optimizer_step
        return loss.detach()

    def optimizer_step(self, lr_multiplier: float) -> torch.Tensor:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_multiplier
        measured = None
        if self.zero_stage == 0:
            # Without ZeRO, DeepSpeed steps our torch optimizer, which reports no norm: measure the
            # (already all-reduced) gradients before the step clips and clears them.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            measured = torch.nn.utils.get_total_norm(grads).detach().float()
        self.engine.step()
        norm = measured if measured is not None else self.engine.get_global_grad_norm()
        if norm is None:
            return torch.tensor(float("nan"), device=self.device)
        return norm.detach().float() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm), device=self.device)

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.engine(inputs.to(self.device), **self.setup.path_kwargs)[0]

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """fp32 weights on rank 0: trainable ones from DeepSpeed's master copy, frozen ones exact."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in self.module.named_parameters():
            if name in self.frozen:
                value = self.frozen[name]
            else:
                value = safe_get_full_fp32_param(param) if self.zero_stage > 0 else None
                if value is None:  # plain data parallel: the module's weights are the master copy
                    value = param.detach()
            if self.rank == 0:
                state[name] = value.detach().float().cpu().clone()
        if self.rank != 0:
            return None
        for name, buffer in self.module.named_buffers():
            state[name] = buffer.detach().float().cpu().clone()
        return state

    def describe(self) -> str:
        offload = (" + CPU optimizer offload" if self.job.engine.offload_optimizer else "") + \
                  (" + CPU param offload" if self.job.engine.offload_param else "")
        return f"{self.world_size} workers, DeepSpeed ZeRO-{self.zero_stage}{offload}"
