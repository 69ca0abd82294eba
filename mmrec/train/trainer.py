"""The single-process training loop: accumulate, clip, step, validate, keep the best, checkpoint, resume.

    trainer = Trainer(prepare_stage("stage1", "tiny", cfg), cfg, train_loader, val_loader, out_dir="runs/x")
    result = trainer.fit()       # resumes from runs/x/checkpoints when a checkpoint is there

Outputs under out_dir: checkpoints/ (see checkpoint.py), best/ (export of the lowest validation loss)
and final/ (export at the last step). Every piece it uses (lm_loss, evaluate, build_scheduler,
prepare_stage, checkpoints) works on its own, for the distributed loops.
"""
from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmrec.train.checkpoint import capture_rng_state, load_latest, restore_rng_state, save_checkpoint
from mmrec.train.config import TrainConfig
from mmrec.train.export import export_weights
from mmrec.train.loss import EvalResult, evaluate, lm_loss
from mmrec.train.schedule import build_scheduler
from mmrec.train.stages import StageSetup


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/Inf; training stops instead of corrupting the weights."""


@dataclass
class TrainResult:
    step: int  # optimizer steps completed, including those before a resume
    history: list[dict[str, float]] = field(default_factory=list)  # per step of this process: step, loss, lr, grad_norm
    evals: list[tuple[int, EvalResult]] = field(default_factory=list)
    best: EvalResult | None = None  # lowest evaluation of this process (the best/ export may predate a resume)
    stopped_early: bool = False
    resumed_from: Path | None = None
    best_export: Path | None = None
    final_export: Path | None = None


class Trainer:
    def __init__(
        self,
        setup: StageSetup,
        cfg: TrainConfig,
        train_loader: Iterable[dict],
        val_loader: Iterable[dict] | None = None,
        *,
        out_dir: str | Path,
        metrics: Any = None,  # None or an object with the mmrec.metrics hook methods
        tokenizer_file: str | Path | None = None,  # copied beside every export, for generate
        log: Callable[[str], None] = lambda line: print(line, flush=True),
    ) -> None:
        self.setup, self.cfg, self.metrics, self.log = setup, cfg, metrics, log
        self.train_loader = train_loader
        self.out_dir = Path(out_dir)
        self.tokenizer_file = tokenizer_file
        self.parameters = [p for group in setup.param_groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(setup.param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.device_type = next(setup.model.parameters()).device.type
        # Materialised once so every evaluation scores exactly the same tokens.
        self.val_batches = list(itertools.islice(iter(val_loader), cfg.eval_batches)) if val_loader is not None else []
        self.step = 0
        self.best_loss = math.inf
        self.evals_since_best = 0

    # ---- checkpoints ----

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def _checkpoint_state(self) -> dict[str, Any]:
        return dict(
            stage=self.setup.stage,
            step=self.step,
            model=self.setup.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            rng=capture_rng_state(),
            train_config=self.cfg.to_dict(),
            model_config=self.setup.model_config.to_dict(),
            data=self.train_loader.state_dict(),
            best_loss=self.best_loss,
            evals_since_best=self.evals_since_best,
        )

    def save_checkpoint(self) -> Path:
        started = time.perf_counter()
        path = save_checkpoint(self.checkpoint_dir, self.step, self._checkpoint_state(), keep=self.cfg.keep_checkpoints)
        if self.metrics is not None:
            self.metrics.on_checkpoint(kind="save", seconds=time.perf_counter() - started, step=self.step)
        return path

    def resume(self) -> Path | None:
        """Load the newest usable checkpoint under out_dir (falling back past broken ones); None if none."""
        started = time.perf_counter()
        found = load_latest(self.checkpoint_dir)
        if found is None:
            return None
        path, state = found
        if state["stage"] != self.setup.stage:
            raise ValueError(f"checkpoint {path} is from {state['stage']}, not {self.setup.stage}; use another out_dir")
        if state["model_config"] != self.setup.model_config.to_dict():
            raise ValueError(f"checkpoint {path} was trained with a different model config; use another out_dir")
        current = self.cfg.to_dict()
        changed = {k: (v, current.get(k)) for k, v in state["train_config"].items() if current.get(k) != v}
        if changed:
            warnings.warn(f"resuming {path} with changed TrainConfig values (old, new): {changed}", stacklevel=2)
        self.setup.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["data"])
        restore_rng_state(state["rng"])
        self.step, self.best_loss, self.evals_since_best = state["step"], state["best_loss"], state["evals_since_best"]
        if self.metrics is not None:
            self.metrics.on_checkpoint(kind="load", seconds=time.perf_counter() - started, step=self.step)
            self.metrics.on_restart()
        self.log(f"[{self.setup.stage}] resumed from {path} at step {self.step}")
        return path

    def export(self, name: str, metrics: dict[str, float]) -> Path:
        return export_weights(
            self.out_dir / name,
            self.setup.export_module,
            kind=self.setup.export_kind,
            model_config=self.setup.model_config,
            stage=self.setup.stage,
            step=self.step,
            metrics=metrics,
            tokenizer_file=self.tokenizer_file,
        )

    # ---- one optimizer step ----

    def _next_batch(self, data: Iterable[dict]) -> dict:
        try:
            return next(data)
        except StopIteration:
            raise RuntimeError(
                "the train loader ran out of batches; give the Trainer an endless loader (TokenStream(infinite=True))"
            ) from None

    def train_step(self, data) -> dict[str, float]:
        cfg, started = self.cfg, time.perf_counter()
        data_wait = forward_backward = 0.0
        loss_sum, tokens, samples = 0.0, 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.grad_accum_steps):
            tick = time.perf_counter()
            batch = self._next_batch(data)
            data_wait += time.perf_counter() - tick
            ids = batch["tokens"]  # [micro_batch_size, seq_len + 1]
            if tuple(ids.shape) != (cfg.micro_batch_size, cfg.seq_len + 1):
                raise ValueError(
                    f"batch tokens have shape {tuple(ids.shape)}, TrainConfig expects "
                    f"({cfg.micro_batch_size}, {cfg.seq_len + 1}) = (micro_batch_size, seq_len + 1); "
                    "build the loader with the same batch size and seq_len"
                )
            tick = time.perf_counter()
            with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = self.setup.forward(ids[:, :-1])  # [B, T, V]
            loss, _ = lm_loss(logits, ids)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"[{self.setup.stage}] loss is {loss.item()} at step {self.step + 1}; lower lr "
                    f"(now {cfg.lr}) or enable grad clipping, and resume from the last checkpoint in {self.checkpoint_dir}"
                )
            # Each micro batch holds the same number of tokens, so the mean of the means is the batch mean.
            (loss / cfg.grad_accum_steps).backward()
            forward_backward += time.perf_counter() - tick
            loss_sum += loss.item()
            tokens += ids.shape[0] * (ids.shape[1] - 1)
            samples += ids.shape[0]
        tick = time.perf_counter()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, max_norm))
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"[{self.setup.stage}] gradient norm is {grad_norm} at step {self.step + 1}")
        lr = max(group["lr"] for group in self.optimizer.param_groups)  # the lr this step runs with
        self.optimizer.step()
        self.scheduler.step()
        optimizer_seconds = time.perf_counter() - tick
        self.step += 1
        stats = dict(
            step=self.step, loss=loss_sum / cfg.grad_accum_steps, lr=lr, grad_norm=grad_norm,
            tokens=tokens, samples=samples, step_seconds=time.perf_counter() - started,
            data_wait_seconds=data_wait, forward_backward_seconds=forward_backward, optimizer_seconds=optimizer_seconds,
        )
        if self.metrics is not None:
            self.metrics.on_step(**stats, flops_per_token=self.setup.flops_per_token)
            h_norms, memory_norms = self.setup.state_norms()
            self.metrics.on_state_norms(h_norms=h_norms, memory_norms=memory_norms)
        return stats

    # ---- validation ----

    def validate(self) -> EvalResult:
        result = evaluate(self.setup.model, self.val_batches, self.setup.forward)
        if self.metrics is not None:
            self.metrics.on_eval(step=self.step, loss=result.loss, perplexity=result.perplexity, accuracy=result.accuracy)
        self.log(
            f"[{self.setup.stage}] eval step {self.step} | val_loss {result.loss:.4f} | "
            f"ppl {result.perplexity:.2f} | acc {result.accuracy:.3f}"
        )
        return result

    @staticmethod
    def _eval_metrics(result: EvalResult | None) -> dict[str, float]:
        if result is None:
            return {}
        return dict(val_loss=result.loss, val_perplexity=result.perplexity, val_accuracy=result.accuracy)

    # ---- the loop ----

    def fit(self, *, resume: bool = True) -> TrainResult:
        cfg, result = self.cfg, TrainResult(step=0)
        if resume:
            result.resumed_from = self.resume()
        self.setup.train_mode()
        data = iter(self.train_loader)  # created after resume(): it starts at the restored data position
        last_eval: EvalResult | None = None
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < cfg.max_steps:
            stats = self.train_step(data)
            result.history.append({k: stats[k] for k in ("step", "loss", "lr", "grad_norm")})
            window_tokens += stats["tokens"]
            if self.step % cfg.log_every == 0 or self.step in (1, cfg.max_steps):
                elapsed = time.perf_counter() - window_start
                self.log(
                    f"[{self.setup.stage}] step {self.step}/{cfg.max_steps} | loss {stats['loss']:.4f} | "
                    f"lr {stats['lr']:.2e} | grad_norm {stats['grad_norm']:.3f} | {window_tokens / elapsed:,.0f} tok/s"
                )
                window_tokens, window_start = 0, time.perf_counter()
            due = cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps)
            if self.val_batches and due:
                last_eval = self.validate()
                self.setup.train_mode()
                result.evals.append((self.step, last_eval))
                if last_eval.loss < self.best_loss - cfg.early_stopping_min_delta:
                    self.best_loss, self.evals_since_best = last_eval.loss, 0
                    result.best_export = self.export("best", self._eval_metrics(last_eval))
                else:
                    self.evals_since_best += 1
                if cfg.early_stopping_patience and self.evals_since_best >= cfg.early_stopping_patience:
                    self.log(
                        f"[{self.setup.stage}] early stop at step {self.step}: no val improvement in "
                        f"{self.evals_since_best} evaluations (best {self.best_loss:.4f})"
                    )
                    result.stopped_early = True
                    break
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        loop_just_saved = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not result.stopped_early
        if not loop_just_saved:
            self.save_checkpoint()  # the final state
        if result.best_export is None and (self.out_dir / "best").is_dir():
            result.best_export = self.out_dir / "best"  # written before a resume
        result.final_export = self.export("final", self._eval_metrics(last_eval))
        if result.best_export is None:
            result.best_export = result.final_export  # no validation: the last weights are the best known
        result.step = self.step
        if result.evals:
            result.best = min((e for _, e in result.evals), key=lambda e: e.loss)
        return result
