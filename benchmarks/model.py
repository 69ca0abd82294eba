"""Training throughput and peak memory of an MM-Rec expert against a same-width causal transformer,
in one run, with MM-Rec's associative memory switched off as a third column (what the memory costs).

    python -m benchmarks.model [--config small] [--batch 1] [--lengths 512 2048 8192 16384] [--repeats 3]
                               [--profile 2048]

Both models get the same d_model, n_layers, ffn_dim, n_heads and vocabulary, RMSNorm, SwiGLU and a
tied head; the transformer's mixer is causal F.scaled_dot_product_attention with RoPE. Each cell is
the median time of one forward + backward (cross-entropy on next-token labels) over --repeats runs
after a warm-up, reported as tokens per second, as model FLOPs utilisation (each model's
flops_per_token against the measured GEMM peak of the dtype in use, mmrec.train.hardware), and the growth of the peak resident memory of a
fresh process over that cell (ru_maxrss, so it counts every allocation; on CUDA, peak allocated).
The ratio is MM-Rec / transformer: above 1 means MM-Rec is faster. --profile T prints torch
profiler figures of MM-Rec's forward + backward at that length (where its time goes).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._harness import print_table
from mmrec.config import ModelConfig, get_config
from mmrec.model import RMSNorm, SwiGLU, build_base, count_parameters
from mmrec.train.hardware import allocator_env, keep_freed_memory, peak_flops


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoPE, half-split form) of x [B, H, T, dh]."""
    T, dh = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, dh // 2, device=x.device, dtype=torch.float32) / (dh // 2))
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv_freq  # [T, dh/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class AttentionBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.d_model
        self.n_heads = config.n_heads
        self.attn_norm = RMSNorm(D, config.norm_eps)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        self.ffn_norm = RMSNorm(D, config.norm_eps)
        self.ffn = SwiGLU(D, config.ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        B, T, D = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)  # [B, H, T, dh]
        x = x + self.out(attended.transpose(1, 2).reshape(B, T, D))
        return x + self.ffn(self.ffn_norm(x))


class TransformerBaseline(nn.Module):
    """Same-width causal transformer with rotary positions (RoPE), RMSNorm, SwiGLU and a tied head.

    n_layers and ffn_dim may be overridden (benchmarks.lm_quality matches MM-Rec's parameter count).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(AttentionBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=config.init_std)

    def features(self, ids: torch.Tensor, state: None = None) -> tuple[torch.Tensor, None]:
        x = self.embedding(ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), None

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.embedding.weight)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        features, _ = self.features(ids)
        return self.head(features), None

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3x forward), counted like Expert.flops_per_token: 2 per weight per
        token for the projections and the tied head, plus causal attention's Q K^T and A V, 2 * 2 * dh
        per (query, key) pair over the T / 2 keys a query sees on average, per head: 2 T D per layer."""
        c = self.config
        D = c.d_model
        block_weights = 3 * D * D + D * D + 3 * D * c.ffn_dim
        forward = c.n_layers * (2 * block_weights + 2 * seq_len * D) + 2 * D * c.vocab_size
        return 3.0 * forward


def _time_train_step(model: nn.Module, tokens: torch.Tensor, repeats: int, autocast_dtype: torch.dtype | None) -> float:
    """Median seconds of forward + backward on tokens [B, T + 1]."""
    device = tokens.device

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernel compilation, autotuning
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


MODELS = ("mmrec", "mmrec-no-memory", "transformer")


def build(kind: str, config: ModelConfig) -> nn.Module:
    if kind == "transformer":
        return TransformerBaseline(config)
    if kind == "mmrec-no-memory":
        return build_base(config.replace(memory=False))
    return build_base(config)


def _cell(kind: str, config: ModelConfig, length: int, args: dict, queue) -> None:
    """One (model, T) measurement in a fresh process, so that its peak memory is its own."""
    try:
        if args["threads"]:
            torch.set_num_threads(args["threads"])
        device = torch.device(args["device"])
        if device.type == "cpu":
            keep_freed_memory()  # as the training loop does (mmrec.train.hardware)
        torch.manual_seed(0)
        model = build(kind, config).to(device)
        tokens = torch.randint(0, config.vocab_size, (args["batch"], length + 1), device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        seconds = _time_train_step(model, tokens, args["repeats"], torch.bfloat16 if args["bf16"] else None)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        flops = model.flops_per_token(length) * args["batch"] * length / seconds
        queue.put({"tokens_per_s": args["batch"] * length / seconds, "peak_mib": peak / 2**20,
                   "params": count_parameters(model), "mfu": flops / args["peak_flops"]})
    except Exception as err:  # noqa: BLE001 - reported in the table
        queue.put({"error": f"{type(err).__name__}: {err}"})


def measure(kind: str, config: ModelConfig, length: int, args: dict) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_cell, args=(kind, config, length, args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def profile(config: ModelConfig, length: int, args) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_base(config).to(device)
    tokens = torch.randint(0, config.vocab_size, (args.batch, length + 1), device=device)
    _time_train_step(model, tokens, 1, None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        _time_train_step(model, tokens, 1, None)
    print(f"\nprofile of MM-Rec forward + backward, T = {length} (two steps: warm-up and one timed)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", help="named model config (default: small)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default: 1)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 16384], help="sequence lengths T")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per cell; the median is reported")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", type=int, default=0, metavar="T", help="also profile MM-Rec at this length")
    args = parser.parse_args(argv)
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if min(args.lengths) < 1:
        parser.error(f"--lengths must be positive, got {args.lengths}")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.update(allocator_env())  # every cell's allocator as a Ray Train worker's (read when it starts)

    config = get_config(args.config)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else None
    peak, peak_source = peak_flops(device, dtype)
    cell_args = {"threads": args.threads, "device": args.device, "batch": args.batch, "repeats": args.repeats,
                 "bf16": args.bf16, "peak_flops": peak}
    with torch.device("meta"):
        params = {kind: count_parameters(build(kind, config)) for kind in args.models}
    print(f"config {config.name}: d_model {config.d_model}, n_layers {config.n_layers}, ffn {config.ffn_dim}, "
          f"heads {config.n_heads}, vocab {config.vocab_size}; batch {args.batch}; device {device}; "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; torch threads {args.threads or torch.get_num_threads()}")
    print("parameters: " + ", ".join(f"{kind} {n / 1e6:.2f}M" for kind, n in params.items()))
    print(f"forward+backward tokens/s (median of {args.repeats}), model FLOPs utilisation against "
          f"{peak / 1e9:,.0f} GFLOP/s ({peak_source}) and peak memory growth of the step, one fresh process per cell")
    header = (["T"] + [f"{kind} tok/s" for kind in args.models] + [f"{kind} MFU" for kind in args.models]
              + [f"{kind} peak MiB" for kind in args.models])
    if {"mmrec", "transformer"} <= set(args.models):
        header.append("MM-Rec / transformer")
    rows = []
    for length in args.lengths:
        results = {kind: measure(kind, config, length, cell_args) for kind in args.models}
        row = [str(length)]
        row += [f"{r['tokens_per_s']:,.0f}" if "error" not in r else r["error"][:40] for r in results.values()]
        row += [f"{r['mfu']:.1%}" if "error" not in r else "-" for r in results.values()]
        row += [f"{r['peak_mib']:,.0f}" if "error" not in r else "-" for r in results.values()]
        if {"mmrec", "transformer"} <= set(args.models):
            ok = all("error" not in results[k] for k in ("mmrec", "transformer"))
            row.append(f"{results['mmrec']['tokens_per_s'] / results['transformer']['tokens_per_s']:.2f}" if ok else "-")
        rows.append(row)
        print(json.dumps({"T": length, **results}), flush=True)
    print()
    print_table(header, rows)
    if args.profile:
        profile(config, args.profile, args)


if __name__ == "__main__":
    main()
