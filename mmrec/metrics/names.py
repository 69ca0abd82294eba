"""Metric names exported by every training worker.

One list shared by the exporter, the Grafana dashboard generator and the tests, so a renamed
metric cannot silently leave a dashboard panel or an alert querying nothing. Names follow the
Prometheus conventions: base units (seconds, bytes, ratios in 0..1), `_total` on counters.
"""

PREFIX = "mmrec"

# Labels carried by every series of a worker, set once in the exporter's constructor.
WORKER_LABELS = ("stage", "expert", "rank")

# Training progress and optimisation.
TRAIN_LOSS = f"{PREFIX}_train_loss"
LEARNING_RATE = f"{PREFIX}_learning_rate"
GRAD_NORM = f"{PREFIX}_grad_norm"
TRAIN_STEP = f"{PREFIX}_train_step"
LAST_STEP_TIMESTAMP = f"{PREFIX}_last_step_timestamp_seconds"
START_TIME = f"{PREFIX}_start_time_seconds"

# Validation.
VALIDATION_LOSS = f"{PREFIX}_validation_loss"
VALIDATION_PERPLEXITY = f"{PREFIX}_validation_perplexity"
VALIDATION_ACCURACY = f"{PREFIX}_validation_token_accuracy_ratio"
VALIDATION_STEP = f"{PREFIX}_validation_step"

# Throughput. Counters are what rate() and the alerts use; the gauges are the worker's own
# measurement of its last step, which is what a person looking at one worker wants to see.
TOKENS = f"{PREFIX}_tokens"  # counter: exposed as mmrec_tokens_total
SAMPLES = f"{PREFIX}_samples"  # counter: exposed as mmrec_samples_total
TOKENS_PER_SECOND = f"{PREFIX}_tokens_per_second"
SAMPLES_PER_SECOND = f"{PREFIX}_samples_per_second"
MFU = f"{PREFIX}_model_flops_utilization_ratio"

# Step time: the histogram of whole steps plus a counter per phase, so that the share of one
# phase is rate(phase) / rate(step_sum) over any window.
STEP_DURATION = f"{PREFIX}_step_duration_seconds"  # histogram
STEP_PHASE = f"{PREFIX}_step_phase_seconds"  # counter with label phase, exposed with _total
STEP_PHASES = ("data_wait", "forward_backward", "optimizer")

# Checkpoints.
CHECKPOINT_DURATION = f"{PREFIX}_checkpoint_duration_seconds"  # histogram, label kind
CHECKPOINT_LAST_DURATION = f"{PREFIX}_checkpoint_last_duration_seconds"  # gauge, label kind
CHECKPOINT_LAST_STEP = f"{PREFIX}_checkpoint_last_step"
CHECKPOINT_LAST_SAVE_TIMESTAMP = f"{PREFIX}_checkpoint_last_save_timestamp_seconds"
CHECKPOINT_KINDS = ("save", "load")

# Reliability events.
RESTARTS = f"{PREFIX}_restarts"  # counter
NAN_ROLLBACKS = f"{PREFIX}_nan_rollbacks"  # counter
CORRUPT_SHARDS = f"{PREFIX}_corrupt_shards_skipped"  # counter

# Model internals: per-layer norms of the recurrent state h and the long-term memory M.
STATE_H_NORM = f"{PREFIX}_recurrent_state_norm"
STATE_MEMORY_NORM = f"{PREFIX}_state_memory_norm"

# Process and accelerator memory.
RESIDENT_MEMORY = f"{PREFIX}_process_resident_memory_bytes"
GPU_ALLOCATED = f"{PREFIX}_gpu_memory_allocated_bytes"
GPU_RESERVED = f"{PREFIX}_gpu_memory_reserved_bytes"

# Run description as an info metric: exposed as mmrec_run_info.
RUN = f"{PREFIX}_run"
