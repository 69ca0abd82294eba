"""The train loop every Ray Train worker runs for one stage, under DeepSpeed ZeRO.

    train_worker(job.to_dict())      # called by TorchTrainer in each worker process

One attempt: find the newest complete checkpoint of the run (falling back past broken ones), build
the stage with mmrec.train.prepare_stage, wrap it with deepspeed.initialize, restore the DeepSpeed
state, the loader position, the frozen weights and the RNG, then train. Every checkpoint_every steps
all ranks write their part and report it to Ray Train (see cluster.checkpoints for the layout).

Faults handled here: a NaN/Inf loss or gradient norm rolls back in-process to the last complete
checkpoint with the lr multiplied by nan_lr_factor (the engine is rebuilt: DeepSpeed cannot load
into a live ZeRO-3 engine); a step that hangs is ended by the watchdog; anything else ends the
attempt and Ray Train (FailureConfig) starts a new one, which resumes here.
"""
from __future__ import annotations

import gc
import json
import math
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cluster import checkpoints, storage
from cluster.config import JobConfig
from cluster.deepspeed_config import build_deepspeed_config
from cluster.faults import hash_sample, inject_step_faults
from cluster.watchdog import StepWatchdog
from cluster.weights import export_stage, full_fp32_state, restore_frozen
from mmrec.train import NonFiniteLossError, build_param_groups, build_scheduler, evaluate, lm_loss, prepare_stage
from mmrec.train.checkpoint import capture_rng_state, restore_rng_state

EXPERT_LABEL = {"stage1": "base", "stage2-text": "text", "stage2-code": "code", "stage3": "fusion"}
STAGE_DOMAINS = {"stage1": ("text", "code"), "stage2-text": ("text",), "stage2-code": ("code",), "stage3": ("text", "code")}


class _NonFinite(Exception):
    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"{what} at step {step}")
        self.step, self.what = step, what


def train_worker(job_dict: dict[str, Any]) -> None:
    """Ray Train entry point (train_loop_per_worker)."""
    import ray.train

    context = ray.train.get_context()
    job = JobConfig.from_dict(job_dict)
    StageWorker(job, rank=context.get_world_rank(), world_size=context.get_world_size(),
                local_rank=context.get_local_rank()).run()


class StageWorker:
    def __init__(self, job: JobConfig, *, rank: int, world_size: int, local_rank: int = 0) -> None:
        self.job, self.rank, self.world_size = job, rank, world_size
        self.cfg = job.train
        self.device = torch.device("cuda", local_rank) if job.scaling.use_gpu else torch.device("cpu")
        if not job.scaling.use_gpu:
            torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))
        self.grad_accum = job.grad_accum_steps_for(world_size)
        self.storage_url = job.run.storage_path
        self.fault_rank = job.fault.fault_rank if job.fault.fault_rank >= 0 else world_size - 1
        self.attempt_id = self._broadcast(secrets.token_hex(4) if rank == 0 else None)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"mmrec-{job.stage}-r{rank}-"))
        self.metrics = self._make_metrics()
        self.tokenizer_file = self._fetch_tokenizer()
        self.val_batches = self._load_val_batches()
        self.lr_scale, self.nan_rollbacks = 1.0, 0
        self.nan_fired: Counter[int] = Counter()
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.engine = self.setup = self.loader = None
        self.frozen: dict[str, torch.Tensor] = {}
        self.last_saved_step = -1

    # ---- small helpers ----

    def log(self, line: str) -> None:
        if self.rank == 0:
            # Not print(): Ray Train patches print to tee into its logger, which doubles every line in the job log.
            sys.stdout.write(f"[{self.job.stage}] {line}\n")
            sys.stdout.flush()

    def _broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _make_metrics(self):
        if not self.job.run.metrics:
            return None
        from mmrec.metrics.exporter import MetricsConfig, MetricsExporter

        return MetricsExporter(
            stage=self.job.stage, expert=EXPERT_LABEL[self.job.stage], rank=self.rank,
            config=MetricsConfig(port=self.job.run.metrics_port),
            run_info={"run": self.job.run_name, "zero_stage": str(self.job.zero.stage), "world_size": str(self.world_size)},
        )

    def _fetch_tokenizer(self) -> Path:
        from core import storage as data_storage
        from core.manifest import load_manifest, manifest_dir

        manifest = load_manifest(self.job.data.manifest)
        url = data_storage.join(manifest_dir(self.job.data.manifest), manifest.tokenizer_path)
        path = self.scratch / Path(manifest.tokenizer_path).name
        path.write_bytes(data_storage.read_bytes(url))
        return path

    def _make_loader(self, split: str, *, world_size: int, rank: int, infinite: bool):
        from mmrec.data import ShardLoader

        return ShardLoader(
            self.job.data.manifest, STAGE_DOMAINS[self.job.stage], split=split, micro_batch_size=self.cfg.micro_batch_size,
            rank=rank, world_size=world_size, seed=self.job.data.seed, on_corrupt=self.job.data.on_corrupt,
            every_batch_has_all_domains=self.job.stage == "stage3", infinite=infinite,
            on_corrupt_shard=(lambda *_: self.metrics.on_corrupt_shard()) if self.metrics else None,
        )

    def _load_val_batches(self) -> list[dict]:
        """Every rank scores the same validation batches (a ZeRO-3 forward is a collective anyway)."""
        if not self.cfg.eval_every:
            return []
        loader = self._make_loader("val", world_size=1, rank=0, infinite=False)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == self.cfg.eval_batches:
                break
        loader.close()
        return batches

    def _init_from(self) -> str | dict[str, str] | None:
        init = self.job.init_from()
        if isinstance(init, dict):
            return {k: str(storage.localize(v, cache_dir=self.scratch)) for k, v in init.items()}
        return str(storage.localize(init, cache_dir=self.scratch)) if init else None

    # ---- building the engine (fresh, on resume, on rollback) ----

    def build(self, resume: checkpoints.ResumePoint | None) -> None:
        import deepspeed

        if self.loader is not None:
            self.loader.close()
        self.engine = self.setup = self.loader = None
        gc.collect()  # a rollback drops the old engine before building the next one
        info = resume.info if resume else None
        if info is not None:
            if info["stage"] != self.job.stage:
                raise ValueError(f"checkpoint {resume.source} is from {info['stage']}, not {self.job.stage}; use another run.name")
        setup = prepare_stage(self.job.stage, self.job.model_config(), self.cfg, init_from=self._init_from())
        setup.model.to(self.device)
        self.frozen = {n: p.detach().clone().cpu() for n, p in setup.model.named_parameters() if not p.requires_grad}
        scaled = self.cfg.replace(lr=self.cfg.lr * self.lr_scale)
        groups = build_param_groups(setup.model, scaled)
        self.peak_lrs = [group["lr"] for group in groups]  # before the scheduler rewrites group["lr"] to the warmup value
        if self.job.zero.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=scaled.lr, betas=tuple(self.cfg.betas), weight_decay=self.cfg.weight_decay, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=scaled.lr, betas=tuple(self.cfg.betas), weight_decay=self.cfg.weight_decay)
        universal = None
        if info is not None and info["world_size"] != self.world_size and info["zero_stage"] > 0:
            self.log(f"world size changed {info['world_size']} -> {self.world_size}: loading through a universal checkpoint")
            universal = checkpoints.to_universal(resume, self.scratch / "universal")
        ds_config = build_deepspeed_config(self.job, self.world_size, load_universal=universal is not None)
        engine, _, _, _ = deepspeed.initialize(
            model=setup.model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: build_scheduler(opt, scaled),
        )
        self.engine, self.setup = engine, setup
        self.step = 0
        self.history = []
        if info is not None:
            load_dir = universal or resume.directory / checkpoints.DEEPSPEED_DIR
            path, _ = engine.load_checkpoint(str(load_dir), tag=info["tag"], load_module_strict=False)
            if path is None:
                raise checkpoints.CheckpointIncomplete(f"DeepSpeed found no checkpoint {info['tag']} in {load_dir}")
            if self.frozen:
                self._restore_frozen(resume.directory / checkpoints.FROZEN_FILE)
            self._reset_lr_schedule()
            self.step = int(info["step"])
            self.history = json.loads((resume.directory / checkpoints.HISTORY_FILE).read_text())
            rng_file = resume.directory / checkpoints.RNG_DIR / f"rank_{self.rank:05d}.pt"
            if rng_file.is_file() and info["world_size"] == self.world_size:
                restore_rng_state(torch.load(rng_file, weights_only=True))
        self.loader = self._make_loader("train", world_size=self.world_size, rank=self.rank, infinite=True)
        if info is not None:
            self.loader.load_state_dict(info["data"])
        self.setup.train_mode()

    def _restore_frozen(self, path: Path) -> None:
        from safetensors.torch import load_file

        saved = load_file(str(path))
        if set(saved) != set(self.frozen):
            raise checkpoints.CheckpointIncomplete(f"{path} does not hold the frozen parameters of {self.job.stage}")
        self.frozen = saved
        restore_frozen(self.engine.module, saved, zero_stage=self.job.zero.stage, rank=self.rank)

    def _reset_lr_schedule(self) -> None:
        """The loaded scheduler state carries the peak lr it was saved with; apply this attempt's lr scale."""
        scheduler, optimizer = self.engine.lr_scheduler, self.engine.optimizer
        scheduler.base_lrs = list(self.peak_lrs)
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group, peak in zip(optimizer.param_groups, self.peak_lrs):
            group["initial_lr"], group["lr"] = peak, peak * factor

    # ---- one optimizer step ----

    def _all_finite(self, value: torch.Tensor) -> bool:
        bad = torch.tensor([0.0 if bool(torch.isfinite(value).all()) else 1.0], device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def train_step(self, data) -> dict[str, Any]:
        step, started = self.step + 1, time.perf_counter()
        inject_step_faults(self.job, rank=self.rank, fault_rank=self.fault_rank, step=step, attempt_id=self.attempt_id)
        data_wait = forward_backward = 0.0
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        digests: list[int] = []
        path = self.setup.path_kwargs
        for _ in range(self.grad_accum):
            tick = time.perf_counter()
            batch = next(data)
            data_wait += time.perf_counter() - tick
            tick = time.perf_counter()
            ids = batch["tokens"].to(self.device)  # [micro_batch, seq_len + 1]
            if self.job.run.record_sample_digests:
                digests += [hash_sample(row) for row in batch["tokens"]]
            logits = self.engine(ids[:, :-1], **path)[0]  # [B, T, V]
            loss, _ = lm_loss(logits, ids)
            if step in self.job.fault.nan_at_steps and self.rank == self.fault_rank and self.nan_fired[step] < self.job.fault.nan_times:
                self.nan_fired[step] += 1
                print(f"[{self.job.stage}] fault hook: NaN loss on rank {self.rank} at step {step}", flush=True)
                loss = loss * float("nan")
            if not self._all_finite(loss.detach()):
                raise _NonFinite(step, "non-finite loss")
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().double()
            forward_backward += time.perf_counter() - tick
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not math.isfinite(grad_norm):
            raise _NonFinite(step, "non-finite gradient norm")
        dist.all_reduce(loss_sum)
        self.step = step
        lr = self._lr_of_step(step)
        tokens = self.job.global_batch_size * self.cfg.seq_len
        stats = dict(
            step=step, loss=float(loss_sum) / (self.grad_accum * self.world_size), lr=lr, grad_norm=grad_norm,
            tokens=tokens, samples=self.job.global_batch_size, step_seconds=time.perf_counter() - started,
            data_wait_seconds=data_wait, forward_backward_seconds=forward_backward,
            optimizer_seconds=0.0,  # DeepSpeed steps inside engine.step(); its time is in forward_backward
        )
        entry = {k: stats[k] for k in ("step", "loss", "lr", "grad_norm", "step_seconds")}
        entry["finished_at"] = time.time()  # wall clock, for restart-time measurements across processes
        if self.job.run.record_sample_digests:
            gathered: list[list[int] | None] = [None] * self.world_size
            dist.all_gather_object(gathered, digests)
            entry["samples"] = [d for part in gathered for d in part]
        self.history.append(entry)
        if self.metrics is not None:
            self.metrics.on_step(**stats, flops_per_token=self.setup.flops_per_token)
            h_norms, memory_norms = self.setup.state_norms()
            self.metrics.on_state_norms(h_norms=h_norms, memory_norms=memory_norms)
        return stats

    def _lr_of_step(self, step: int) -> float:
        """The peak lr of the main group times the schedule at this step (what the step ran with)."""
        scheduler = self.engine.lr_scheduler
        return max(self.peak_lrs) * scheduler.lr_lambdas[0](step - 1)

    # ---- evaluation, checkpoints, exports ----

    def validate(self) -> dict[str, float]:
        path = self.setup.path_kwargs
        result = evaluate(self.engine.module, self.val_batches, lambda ids: self.engine(ids.to(self.device), **path)[0])
        self.setup.train_mode()
        if self.metrics is not None:
            self.metrics.on_eval(step=self.step, loss=result.loss, perplexity=result.perplexity, accuracy=result.accuracy)
        self.log(f"eval step {self.step} | val_loss {result.loss:.4f} | ppl {result.perplexity:.2f} | acc {result.accuracy:.3f}")
        return dict(val_loss=result.loss, val_perplexity=result.perplexity, val_accuracy=result.accuracy)

    def save_and_report(self, metrics: dict[str, float]) -> None:
        import ray.train

        started = time.perf_counter()
        local = self.scratch / f"checkpoint-{self.step}"
        shutil.rmtree(local, ignore_errors=True)
        tag = f"step{self.step}"
        self.engine.save_checkpoint(
            str(local / checkpoints.DEEPSPEED_DIR), tag=tag,
            client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}},
        )
        state = full_fp32_state(self.engine.module, self.frozen, zero_stage=self.job.zero.stage, bf16=self.cfg.bf16, rank=self.rank)
        if self.rank == 0:
            export_stage(local / checkpoints.EXPORT_DIR, self.setup, state, step=self.step, metrics=metrics,
                         tokenizer_file=self.tokenizer_file)
        (local / checkpoints.RNG_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(capture_rng_state(), local / checkpoints.RNG_DIR / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            if self.frozen:
                from safetensors.torch import save_file

                save_file({n: t.contiguous() for n, t in self.frozen.items()}, str(local / checkpoints.FROZEN_FILE))
            (local / checkpoints.HISTORY_FILE).write_text(json.dumps(self.history))
            info = dict(
                stage=self.job.stage, step=self.step, tag=tag, world_size=self.world_size, zero_stage=self.job.zero.stage,
                data=self.loader.state_dict(), lr_scale=self.lr_scale, nan_rollbacks=self.nan_rollbacks,
                job=self.job.to_dict(), model_config=self.setup.model_config.to_dict(), metrics=metrics,
            )
            (local / checkpoints.RUN_FILE).write_text(json.dumps(info, indent=1))
        checkpoints.seal_rank(local, self.rank)
        name = checkpoints.checkpoint_dir_name(self.step, self.attempt_id)
        ray.train.report(
            {"step": self.step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(str(local)), checkpoint_dir_name=name,
        )
        shutil.rmtree(local, ignore_errors=True)
        self.last_saved_step = self.step
        if self.metrics is not None:
            self.metrics.on_checkpoint(kind="save", seconds=time.perf_counter() - started, step=self.step)
        self.log(f"checkpoint {name} reported ({time.perf_counter() - started:.1f}s)")

    # ---- the loop ----

    def _resume_point(self) -> checkpoints.ResumePoint | None:
        return checkpoints.find_resume_point(self.storage_url, self.job.run_name, download_to=self.scratch / "resume")

    def _rollback(self, error: _NonFinite) -> None:
        self.nan_rollbacks += 1
        if self.metrics is not None:
            self.metrics.on_nan_rollback()
        limit = self.job.fault_tolerance.nan_max_rollbacks
        if self.nan_rollbacks > limit:
            raise NonFiniteLossError(
                f"[{self.job.stage}] {error.what} at step {error.step} after {limit} rollbacks "
                f"(fault_tolerance.nan_max_rollbacks={limit}, lr now {self.cfg.lr * self.lr_scale:.3g}); training is "
                "unstable: lower train.lr, enable train.grad_clip, or inspect the data around this step"
            )
        self.lr_scale *= self.job.fault_tolerance.nan_lr_factor
        resume = self._resume_point()
        self.log(
            f"{error.what} at step {error.step}: rollback {self.nan_rollbacks}/{limit} to "
            f"{resume.source if resume else 'the initial weights'} with lr x{self.lr_scale:g}"
        )
        self.build(resume)

    def run(self) -> None:
        started = time.perf_counter()
        resume = self._resume_point()
        if resume is not None:
            self.lr_scale = float(resume.info.get("lr_scale", 1.0))
            self.nan_rollbacks = int(resume.info.get("nan_rollbacks", 0))
        self.build(resume)
        if resume is not None:
            self.log(f"resumed from {resume.source} at step {self.step} (world size {resume.info['world_size']} -> {self.world_size})")
            if self.metrics is not None:
                self.metrics.on_restart()
                self.metrics.on_checkpoint(kind="load", seconds=time.perf_counter() - started, step=self.step)
        self.log(
            f"{self.world_size} workers, ZeRO-{self.job.zero.stage}"
            f"{' + CPU optimizer offload' if self.job.zero.offload_optimizer else ''}"
            f"{' + CPU param offload' if self.job.zero.offload_param else ''}, "
            f"{'bf16' if self.cfg.bf16 else 'fp32'}, global batch {self.job.global_batch_size} "
            f"(micro {self.cfg.micro_batch_size} x accum {self.grad_accum} x {self.world_size} workers)"
        )
        cfg, eval_metrics = self.cfg, {}
        watchdog = StepWatchdog(self.job.fault_tolerance.step_timeout_s)
        data = iter(self.loader)
        try:
            while self.step < cfg.max_steps:
                watchdog.arm(f"{self.step + 1}")
                try:
                    stats = self.train_step(data)
                except _NonFinite as error:
                    watchdog.disarm()
                    self._rollback(error)
                    data = iter(self.loader)
                    continue
                watchdog.disarm()
                if self.step % cfg.log_every == 0 or self.step in (1, cfg.max_steps):
                    self.log(
                        f"step {self.step}/{cfg.max_steps} | loss {stats['loss']:.4f} | lr {stats['lr']:.2e} | "
                        f"grad_norm {stats['grad_norm']:.3f} | {stats['tokens'] / stats['step_seconds']:,.0f} tok/s"
                    )
                if self.val_batches and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    eval_metrics = self.validate()
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == cfg.max_steps:
                    self.save_and_report({"loss": stats["loss"], **eval_metrics})
            if self.last_saved_step != self.step:
                # Resumed at max_steps (the job was re-submitted after finishing): report the final state again.
                if self.val_batches:
                    eval_metrics = self.validate()
                self.save_and_report(eval_metrics)
        finally:
            watchdog.close()
            if self.loader is not None:
                self.loader.close()
            if self.metrics is not None:
                self.metrics.close()
            shutil.rmtree(self.scratch, ignore_errors=True)

