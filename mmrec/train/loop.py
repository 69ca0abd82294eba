"""The one training loop, for every engine: read it top to bottom in Trainer.fit().

    result = Trainer(load_config("configs/smoke.toml", stage="stage1")).fit()

One process (engine "torch") or one Ray Train worker among many (engine "deepspeed", driven by
cluster.worker, which only adds the Ray glue through WorkerContext). Either way the loop does:
gradient accumulation, clipping, the warmup + cosine schedule, validation, early stopping, the
best and latest exports, NaN/Inf rollback to the last checkpoint at a lower lr (a bounded number
of times), checkpoints at a cadence and on SIGINT/SIGTERM, metrics, logs and the run's records.

Host syncs: exactly one per optimizer step (the loss, the grad norm and, on logged steps, the state
norms come back in one tensor), so a GPU stream never waits on Python between micro-batches.
"""
from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import storage
from core.config import Config, ConfigError
from core.configtree import to_dict
from core.manifest import TokenizerMismatchError, load_manifest, load_manifest_tokenizer
from core.stages import get_stage
from core.tokenizer import TOKENIZER_FILE
from mmrec.train import checkpoint as ckpt
from mmrec.train.engine import Engine, TorchEngine
from mmrec.train.export import write_export
from mmrec.train.faults import FaultHook, hash_sample
from mmrec.train.hardware import keep_freed_memory, peak_flops, resolve_precision
from mmrec.train.loss import EvalResult, evaluate
from mmrec.train.preflight import preflight
from mmrec.train.records import RunRecords
from mmrec.train.schedule import lr_multiplier
from mmrec.train.stage_setup import StageSetup, prepare_stage, resolve_model_config

log = logging.getLogger("mmrec.train")


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm stayed NaN/Inf through every allowed rollback."""


class _NonFinite(Exception):
    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"{what} at step {step}")
        self.step, self.what = step, what


@dataclass
class WorkerContext:
    """What differs between one process and a Ray Train worker: the loop's only seam to Ray."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Hands a sealed local checkpoint directory over: None publishes it into the run directory
    # through core.storage; a Ray Train worker passes a function calling ray.train.report.
    publish: Callable[[Path, str, dict[str, Any]], None] | None = None
    watchdog: Any = None  # .arm(label) / .disarm() around every step (cluster.watchdog), or None


@dataclass
class TrainResult:
    run_url: str
    step: int
    tokens: int
    stopped_early: bool = False
    interrupted: str | None = None  # the signal that stopped the run at a step boundary
    resumed_from: str | None = None
    last_eval: EvalResult | None = None
    best_loss: float | None = None
    latest_export: str | None = None
    best_export: str | None = None


class Trainer:
    def __init__(self, cfg: Config, *, context: WorkerContext | None = None, metrics: Any = None) -> None:
        self.cfg, self.train = cfg, cfg.train
        self.ctx = context or WorkerContext()
        self.rank, self.world_size = self.ctx.rank, self.ctx.world_size
        self.stage = get_stage(cfg.stage)
        self.metrics = metrics  # None, or an object with the mmrec.metrics exporter's hooks
        self.run_url = storage.join(cfg.run.storage_path, cfg.run_name)
        preflight(cfg)  # the same checks the launcher ran before any worker started: cheap, and a worker may differ
        self.manifest = load_manifest(cfg.data.manifest)
        self.model_cfg = resolve_model_config(cfg, self.manifest)
        self.grad_accum = cfg.grad_accum_steps_for(self.world_size)
        self.device = torch.device("cuda", self.ctx.local_rank) if cfg.scaling.use_gpu else torch.device("cpu")
        self.autocast_dtype, self.precision_note = resolve_precision(self.train.precision, self.device)
        self.allocator_note = keep_freed_memory() if self.device.type == "cpu" else ""
        self.scratch = Path(tempfile.mkdtemp(prefix=f"mmrec-{cfg.stage}-r{self.rank}-"))
        self.attempt_id = self._broadcast_attempt_id()
        self.tokenizer_file = self._fetch_tokenizer()
        self.init_from = self._fetch_init_exports()
        self.val_batches = self._val_batches()
        self.faults = FaultHook(cfg.fault, run_url=self.run_url, rank=self.rank, world_size=self.world_size)
        self.stop_signal: str | None = None
        self._stop = threading.Event()
        self.engine: Engine | None = None
        self.setup: StageSetup | None = None
        self.loader = None
        self.step = self.tokens = 0
        self.best_loss, self.evals_since_best = math.inf, 0
        self.lr_scale, self.nan_rollbacks = 1.0, 0
        self._exported: tuple[int, str] | None = None  # (step, name) of the export written last
        self._records: RunRecords | None = None
        self.peak, self.peak_note = (cfg.metrics.peak_flops, "metrics.peak_flops") if cfg.metrics.peak_flops else \
            peak_flops(self.device, self.autocast_dtype)

    # ---- small helpers ----

    def info(self, line: str) -> None:
        if self.rank == 0:
            log.info("[%s] %s", self.cfg.stage, line)

    def request_stop(self, signal_name: str) -> None:
        """Stop at the next step boundary after writing a checkpoint (safe to call from a signal handler)."""
        self.stop_signal = signal_name
        self._stop.set()

    def _broadcast_attempt_id(self) -> str:
        if self.world_size == 1:
            return secrets.token_hex(4)
        import torch.distributed as dist

        box = [secrets.token_hex(4) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _fetch_tokenizer(self) -> Path:
        """The dataset's tokenizer, verified against the manifest (hash, vocabulary, EOS), copied beside every export."""
        try:
            tokenizer = load_manifest_tokenizer(self.cfg.data.manifest, self.manifest)
        except TokenizerMismatchError as error:
            raise ConfigError(str(error)) from None
        path = self.scratch / TOKENIZER_FILE
        path.write_bytes(tokenizer.model_bytes)
        return path

    def _fetch_init_exports(self) -> str | dict[str, str] | None:
        """The stage's starting exports as local directories (run:<name> references resolved, S3 downloaded)."""
        run = self.cfg.run
        paths = {key: getattr(run, key) for key in self.stage.init_keys if getattr(run, key)}
        if not paths:
            return None
        local = {}
        for key, reference in paths.items():
            url = ckpt.resolve_export(reference, run.storage_path)
            local[key] = str(storage.localize(url, self.scratch / "init" / key))
        if self.stage.trains == "fusion":
            return {"text": local.get("init_from_text"), "code": local.get("init_from_code")}
        return local["init_from"]

    def _loader(self, split: str, *, rank: int, world_size: int, infinite: bool):
        from mmrec.data import ShardLoader

        return ShardLoader(
            self.cfg.data.manifest, self.stage.domains, split=split, micro_batch_size=self.train.micro_batch_size,
            rank=rank, world_size=world_size, seed=self.cfg.data.seed, on_corrupt=self.cfg.data.on_corrupt,
            every_batch_has_all_domains=self.stage.every_batch_has_all_domains, infinite=infinite,
            prefetch=infinite, on_corrupt_shard=(lambda *_: self.metrics.on_corrupt_shard()) if self.metrics else None,
        )

    def _val_batches(self) -> list[dict]:
        """The same validation batches on every rank and at every evaluation (a ZeRO-3 forward is collective)."""
        if not self.train.eval_every:
            return []
        loader = self._loader("val", rank=0, world_size=1, infinite=False)
        try:
            return list(itertools.islice(iter(loader), self.train.eval_batches))
        finally:
            loader.close()

    # ---- building the engine: fresh, on resume, on rollback ----

    def _start(self, resume: ckpt.ResumePoint | None) -> None:
        if self.loader is not None:
            self.loader.close()
        if self.engine is not None:
            self.engine.close()
        self.engine = self.setup = self.loader = None
        gc.collect()  # a rollback drops the old engine before building the next one
        info = resume.info if resume is not None else None
        if info is not None:
            self._check_resumable(resume)
        self.setup = prepare_stage(self.stage, self.model_cfg, self.train, init_from=self.init_from)
        if self.cfg.engine.kind == "deepspeed":
            from mmrec.train.deepspeed_engine import DeepSpeedEngine

            self.engine = DeepSpeedEngine(
                self.setup, self.cfg, rank=self.rank, world_size=self.world_size, device=self.device,
                autocast_dtype=self.autocast_dtype, scratch=self.scratch, log=self.info, lr_scale=self.lr_scale,
                resume=resume)
        else:
            self.engine = TorchEngine(self.setup, self.train, grad_accum=self.grad_accum, device=self.device,
                                      autocast_dtype=self.autocast_dtype, lr_scale=self.lr_scale, resume=resume)
        self.loader = self._loader("train", rank=self.rank, world_size=self.world_size, infinite=True)
        self.step = self.tokens = 0
        if info is not None:
            try:
                self.loader.load_state_dict(info["data"])
            except ValueError as error:
                raise ConfigError(f"cannot resume {resume.source}: {error}") from None
            self.step, self.tokens = int(info["step"]), int(info["tokens"])
            self.best_loss, self.evals_since_best = float(info["best_loss"]), int(info["evals_since_best"])
            rng = resume.directory / ckpt.RNG_DIR / f"rank_{self.rank:05d}.pt"
            if rng.is_file() and info["world_size"] == self.world_size:
                ckpt.restore_rng_state(torch.load(rng, weights_only=True))
        self.setup.train_mode()

    def _check_resumable(self, resume: ckpt.ResumePoint) -> None:
        """Refuse what cannot continue; say which changed hyper-parameters this run applies."""
        info, source = resume.info, resume.source
        if info["stage"] != self.cfg.stage:
            raise ConfigError(f"{source} is a checkpoint of {info['stage']}, not {self.cfg.stage}; choose another run.name")
        if info["model_config"] != self.model_cfg.to_dict():
            raise ConfigError(f"{source} was trained with another model config; resume with the same [model] "
                              "and dataset, or choose another run.name")
        old = info["config"]["train"]
        if old["seq_len"] != self.train.seq_len:
            raise ConfigError(f"{source} trained at train.seq_len={old['seq_len']}, this run asks for "
                              f"{self.train.seq_len}: a run keeps its sequence length; choose another run.name")
        changed = {k: (old[k], v) for k, v in to_dict(self.train).items() if k in old and old[k] != v}
        if changed:
            # The schedule is a function of the step and these values, so resuming applies them.
            self.info("resuming with changed [train] values, applied from here on: " +
                      ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))

    # ---- one optimizer step ----

    def _train_step(self, data: Iterator[dict], log_step: bool) -> dict[str, Any]:
        step, engine = self.step + 1, self.engine
        self.faults.before_step(step)
        poison = self.faults.poison_loss(step)
        started = time.perf_counter()
        data_wait = forward_backward = 0.0
        loss_sum = torch.zeros((), device=self.device)
        digests: list[int] = []
        for micro in range(self.grad_accum):
            tick = time.perf_counter()
            batch = next(data)
            data_wait += time.perf_counter() - tick
            tick = time.perf_counter()
            ids = batch["tokens"].to(self.device, non_blocking=True)  # [micro_batch, seq_len + 1]
            loss_sum += engine.forward_backward(ids, poison=poison and micro == 0)
            forward_backward += time.perf_counter() - tick
            if self.cfg.run.record_sample_digests:
                digests += [hash_sample(row) for row in batch["tokens"]]
        tick = time.perf_counter()
        multiplier = lr_multiplier(step - 1, warmup_steps=self.train.warmup_steps, max_steps=self.train.max_steps,
                                   min_lr_ratio=self.train.min_lr_ratio)
        grad_norm = engine.optimizer_step(multiplier)
        optimizer_seconds = time.perf_counter() - tick
        # The one host sync of the step: summed loss and grad norm of all ranks (+ state norms when logged).
        summary = engine.all_reduce_sum(torch.stack([loss_sum.float(), grad_norm.float().to(self.device)]))
        if log_step and self.metrics is not None:
            summary = torch.cat([summary, self.setup.state_norms().float().flatten().to(self.device)])
        values = summary.tolist()
        loss = values[0] / (self.grad_accum * self.world_size)
        norm = values[1] / self.world_size  # every rank holds the same global norm
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise _NonFinite(step, "non-finite loss" if not math.isfinite(loss) else "non-finite gradient norm")
        self.step = step
        worker_samples = self.grad_accum * self.train.micro_batch_size
        self.tokens += self.cfg.global_batch_size * self.train.seq_len
        stats = dict(
            step=step, loss=loss, lr=engine.peak_lr * multiplier,
            grad_norm=norm, tokens=worker_samples * self.train.seq_len, samples=worker_samples,
            step_seconds=time.perf_counter() - started, data_wait_seconds=data_wait,
            forward_backward_seconds=forward_backward, optimizer_seconds=optimizer_seconds,
        )
        if self.metrics is not None:
            self.metrics.on_step(**stats, flops_per_token=self.setup.flops_per_token, peak_flops=self.peak)
            if log_step:
                layers = (len(values) - 2) // 2
                self.metrics.on_state_norms(h_norms=values[2:2 + layers], memory_norms=values[2 + layers:])
        if self.cfg.run.record_sample_digests:
            stats["samples_digests"] = [d for part in engine.all_gather_object(digests) for d in part]
        return stats

    # ---- evaluation, exports, checkpoints ----

    def _validate(self) -> EvalResult:
        result = evaluate(self.setup.model, self.val_batches, self.engine.logits)
        result = self.engine.broadcast_object(result)  # every rank decides on rank 0's figures
        self.setup.train_mode()
        if self.metrics is not None:
            self.metrics.on_eval(step=self.step, loss=result.loss, perplexity=result.perplexity, accuracy=result.accuracy)
        self.info(f"eval step {self.step} | val_loss {result.loss:.4f} | ppl {result.perplexity:.2f} | "
                  f"acc {result.accuracy:.3f}")
        return result

    def _export(self, pointers: tuple[str, ...], metrics: dict[str, float]) -> str:
        """Write this step's export (once; a collective under ZeRO-3) and point `pointers` at it."""
        name = ckpt.export_name(self.step)
        if self._exported is None or self._exported[0] != self.step:
            state = self.engine.full_state()
            if self.rank == 0:
                local = write_export(self.scratch / "export", state, prefix=self.setup.export_prefix,
                                     kind=self.stage.export_kind, model_config=self.model_cfg, stage=self.cfg.stage,
                                     step=self.step, metrics=metrics, tokenizer_file=self.tokenizer_file)
                storage.upload_dir(local, storage.join(ckpt.exports_url(self.run_url), name))
            self._exported = (self.step, name)
        if self.rank == 0:
            for pointer in pointers:
                ckpt.write_pointer(self.run_url, pointer, name)
            ckpt.prune_exports(self.run_url, keep_newest=self.train.keep_checkpoints)
        return storage.join(ckpt.exports_url(self.run_url), name)

    def _save_checkpoint(self, metrics: dict[str, float], records: RunRecords | None) -> None:
        started = time.perf_counter()
        name = ckpt.checkpoint_name(self.step, self.attempt_id)
        local = self.scratch / name
        shutil.rmtree(local, ignore_errors=True)
        self.engine.save(local / ckpt.ENGINE_DIR)
        (local / ckpt.RNG_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(ckpt.capture_rng_state(), local / ckpt.RNG_DIR / f"rank_{self.rank:05d}.pt")
        export = self._export(("latest",), metrics)
        if self.rank == 0:
            info = dict(
                stage=self.cfg.stage, step=self.step, tokens=self.tokens, world_size=self.world_size,
                engine=self.cfg.engine.kind, zero_stage=self.cfg.engine.zero_stage,
                engine_tag=getattr(self.engine, "tag", None), data=self.loader.state_dict(),
                best_loss=self.best_loss, evals_since_best=self.evals_since_best, lr_scale=self.lr_scale,
                nan_rollbacks=self.nan_rollbacks, config=self.cfg.to_dict(), model_config=self.model_cfg.to_dict(),
                metrics=metrics, export=export, saved_at=time.time(),
            )
            (local / ckpt.RUN_FILE).write_text(json.dumps(info, indent=1))
        ckpt.seal_rank(local, self.rank)
        if self.ctx.publish is not None:
            self.ctx.publish(local, name, {"step": self.step, **metrics})
        else:
            ckpt.publish_checkpoint(local, self.run_url, name, keep=self.train.keep_checkpoints)
        shutil.rmtree(local, ignore_errors=True)
        if records is not None:
            records.sync()
        self._last_saved = self.step
        if self.metrics is not None:
            self.metrics.on_checkpoint(kind="save", seconds=time.perf_counter() - started, step=self.step)
        self.info(f"checkpoint {name} ({time.perf_counter() - started:.1f}s)")

    def _rollback(self, error: _NonFinite) -> None:
        self.nan_rollbacks += 1
        if self.metrics is not None:
            self.metrics.on_nan_rollback()
        limit = self.cfg.fault_tolerance.nan_max_rollbacks
        if self.nan_rollbacks > limit:
            raise NonFiniteLossError(
                f"[{self.cfg.stage}] {error.what} at step {error.step} after {limit} rollbacks "
                f"(fault_tolerance.nan_max_rollbacks={limit}, lr now {self.train.lr * self.lr_scale:.3g}); training "
                "is unstable: lower train.lr, enable train.grad_clip, or inspect the data around this step"
            )
        self.lr_scale *= self.cfg.fault_tolerance.nan_lr_factor
        resume = ckpt.find_resume_point(self.run_url, download_to=self.scratch / "resume")
        self.info(f"{error.what} at step {error.step}: rollback {self.nan_rollbacks}/{limit} to "
                  f"{resume.source if resume else 'the initial weights'} with lr x{self.lr_scale:g}")
        self._start(resume)
        self._exported = None
        if self._records is not None:
            self._records.truncate(self.step)  # the steps after the checkpoint are trained again

    # ---- the loop ----

    def fit(self) -> TrainResult:
        cfg, train = self.cfg, self.train
        resume = ckpt.find_resume_point(self.run_url, download_to=self.scratch / "resume")
        if resume is not None:
            self.lr_scale = float(resume.info["lr_scale"])
            self.nan_rollbacks = int(resume.info["nan_rollbacks"])
        started = time.perf_counter()
        self._start(resume)
        result = TrainResult(run_url=self.run_url, step=self.step, tokens=self.tokens,
                             resumed_from=resume.source if resume else None)
        if resume is not None:
            self.info(f"resumed from {resume.source} at step {self.step} "
                      f"(world size {resume.info['world_size']} -> {self.world_size})")
            if self.metrics is not None:
                self.metrics.on_restart()
                self.metrics.on_checkpoint(kind="load", seconds=time.perf_counter() - started, step=self.step)
        self.info(f"{self.engine.describe()}, {self.precision_note}; global batch {cfg.global_batch_size} "
                  f"(micro {train.micro_batch_size} x accum {self.grad_accum} x {self.world_size} workers) "
                  f"x {train.seq_len} tokens; {self.setup.flops_per_token / 1e6:.1f} MFLOP/token, "
                  f"peak {self.peak / 1e12:.2f} TFLOP/s ({self.peak_note}); run {self.run_url}")
        if self.allocator_note:
            self.info(self.allocator_note)
        records = self._records = RunRecords(
            self.run_url, self.scratch, resume_step=self.step if resume else None, tensorboard=cfg.run.tensorboard,
            plots=cfg.run.plots, title=f"{cfg.stage} ({cfg.run_name})") if self.rank == 0 else None
        self._last_saved = self.step if resume is not None else -1
        eval_metrics: dict[str, float] = {}
        watchdog = self.ctx.watchdog
        data = iter(self.loader)
        window_start, window_steps = time.perf_counter(), 0
        try:
            while self.step < train.max_steps:
                log_step = (self.step + 1) % train.log_every == 0 or self.step + 1 in (1, train.max_steps)
                if watchdog is not None:
                    watchdog.arm(str(self.step + 1))
                try:
                    stats = self._train_step(data, log_step)
                except _NonFinite as error:
                    if watchdog is not None:
                        watchdog.disarm()
                    self._rollback(error)
                    data = iter(self.loader)
                    continue
                if watchdog is not None:
                    watchdog.disarm()
                window_steps += 1
                if log_step:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * cfg.global_batch_size * train.seq_len / elapsed
                    mfu = self.setup.flops_per_token * tokens_per_s / self.world_size / self.peak
                    eta = elapsed / window_steps * (train.max_steps - self.step)
                    self.info(f"step {self.step}/{train.max_steps} | loss {stats['loss']:.4f} | lr {stats['lr']:.2e} | "
                              f"grad_norm {stats['grad_norm']:.3f} | {tokens_per_s:,.0f} tok/s | mfu {mfu:.1%} | "
                              f"eta {_duration(eta)}")
                    if records is not None:
                        records.append(dict(
                            kind="train", step=self.step, tokens=self.tokens, loss=stats["loss"], lr=stats["lr"],
                            grad_norm=stats["grad_norm"], tokens_per_s=tokens_per_s, mfu=mfu,
                            step_seconds=stats["step_seconds"], data_wait_seconds=stats["data_wait_seconds"],
                            forward_backward_seconds=stats["forward_backward_seconds"],
                            optimizer_seconds=stats["optimizer_seconds"], time=time.time(),
                            **({"samples": stats["samples_digests"]} if "samples_digests" in stats else {})))
                    window_start, window_steps = time.perf_counter(), 0
                stop_early = False
                if self.val_batches and (self.step % train.eval_every == 0 or self.step == train.max_steps):
                    evaluation = self._validate()
                    result.last_eval = evaluation
                    eval_metrics = dict(val_loss=evaluation.loss, val_perplexity=evaluation.perplexity,
                                        val_accuracy=evaluation.accuracy)
                    improved = evaluation.loss < self.best_loss - train.early_stopping_min_delta
                    if improved:
                        self.best_loss, self.evals_since_best = evaluation.loss, 0
                        self._export(("best",), eval_metrics)
                    else:
                        self.evals_since_best += 1
                    if records is not None:
                        records.append(dict(kind="eval", step=self.step, tokens=self.tokens, **eval_metrics,
                                            best=improved, time=time.time()))
                    stop_early = bool(train.early_stopping_patience) and \
                        self.evals_since_best >= train.early_stopping_patience
                    if stop_early:
                        self.info(f"early stop at step {self.step}: no validation improvement in "
                                  f"{self.evals_since_best} evaluations (best {self.best_loss:.4f})")
                        result.stopped_early = True
                due = bool(train.checkpoint_every) and self.step % train.checkpoint_every == 0
                if due or stop_early or self._stop.is_set() or self.step == train.max_steps:
                    self._save_checkpoint({"loss": stats["loss"], **eval_metrics}, records)
                if stop_early:
                    break
                if self._stop.is_set():
                    result.interrupted = self.stop_signal
                    self.info(f"stopped by {self.stop_signal} at step {self.step}; checkpoint written, "
                              "run the same command to resume")
                    break
            if self._last_saved != self.step:
                # Resumed at max_steps (a finished job submitted again): report the final state again.
                self._save_checkpoint(eval_metrics, records)
        finally:
            if self.loader is not None:
                self.loader.close()
            if records is not None:
                records.close()
            shutil.rmtree(self.scratch, ignore_errors=True)
        result.step, result.tokens = self.step, self.tokens
        result.best_loss = self.best_loss if math.isfinite(self.best_loss) else None
        result.latest_export = ckpt.resolve_export(f"run:{cfg.run_name}@latest", cfg.run.storage_path)
        if self.best_loss < math.inf:
            result.best_export = ckpt.resolve_export(f"run:{cfg.run_name}@best", cfg.run.storage_path)
        return result


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
