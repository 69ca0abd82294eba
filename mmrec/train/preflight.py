"""Everything a stage needs, checked before any worker starts (and again inside each worker).

    preflight(cfg)      # a one-line summary, or ConfigError naming the problem and what to do
"""
from __future__ import annotations

from core import storage
from core.config import Config, ConfigError
from core.manifest import TokenizerMismatchError, load_manifest, load_manifest_tokenizer
from core.stages import get_stage
from mmrec.train import checkpoint as ckpt
from mmrec.train.stage_setup import resolve_model_config


def preflight(cfg: Config) -> str:
    """Check everything a stage needs before any worker starts; a one-line summary, ConfigError otherwise.

    The manifest exists and parses, its tokenizer matches its hash, the sequence length and the
    vocabulary agree with the model, the exports the stage starts from exist and fit its shape, and
    the run directory is writable. The Trainer runs the same checks again in every worker.
    """
    from mmrec.train.export import read_export

    if not cfg.stage:
        raise ConfigError("no stage given: pass --stage or set stage = \"...\" in the config file")
    stage = get_stage(cfg.stage)
    if not cfg.data.manifest:
        raise ConfigError("data.manifest is empty: give the manifest.json of a prepared dataset (python -m launchers.prep)")
    try:
        manifest = load_manifest(cfg.data.manifest)
    except storage.StorageNotFound:
        raise ConfigError(f"data.manifest={cfg.data.manifest} does not exist: prepare the data first "
                          "(python -m launchers.prep) or fix the path") from None
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"data.manifest={cfg.data.manifest} is not a usable manifest: {error}") from None
    if manifest.seq_len != cfg.train.seq_len:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} but {cfg.data.manifest} holds samples of seq_len "
                          f"{manifest.seq_len}: set train.seq_len={manifest.seq_len} or prepare data with that length")
    model_cfg = resolve_model_config(cfg, manifest)
    for domain in stage.domains:
        for split in ("train", "val") if cfg.train.eval_every else ("train",):
            if not sum(shard.samples for shard in manifest.select(domain, split)):
                have = sorted({(s.domain, s.split) for s in manifest.shards})
                raise ConfigError(
                    f"{cfg.data.manifest} has no {domain}/{split} samples (it has {have}), which {cfg.stage} needs: "
                    + ("prepare more data or a larger prep.val_fraction, or set train.eval_every=0 to train without "
                       "validation" if split == "val" else "prepare data with that domain"))
    try:
        load_manifest_tokenizer(cfg.data.manifest, manifest)
    except TokenizerMismatchError as error:
        raise ConfigError(str(error)) from None
    missing = [key for key in stage.init_keys if not getattr(cfg.run, key)]
    if stage.init_required and missing:
        raise ConfigError(f"{cfg.stage} needs run.{' and run.'.join(missing)} (the export(s) it starts from, "
                          "a directory or run:<name>)")
    for key in stage.init_keys:
        reference = getattr(cfg.run, key)
        if not reference:
            continue
        try:
            export = read_export(ckpt.resolve_export(reference, cfg.run.storage_path))
        except (FileNotFoundError, ValueError, storage.StorageError) as error:
            raise ConfigError(f"run.{key}={reference}: {error}") from None
        if export.kind != "expert" or export.model_config.vocab_size != model_cfg.vocab_size:
            raise ConfigError(
                f"run.{key}={reference} is a {export.kind!r} export of vocabulary {export.model_config.vocab_size}; "
                f"{cfg.stage} needs an expert export of this dataset's vocabulary {model_cfg.vocab_size}")
    storage.check_writable_location(storage.join(cfg.run.storage_path, cfg.run_name))
    return (f"{cfg.stage}: model {cfg.model_name} (vocab {model_cfg.vocab_size} from the manifest, seq_len "
            f"{cfg.train.seq_len}), data {cfg.data.manifest}, run {storage.join(cfg.run.storage_path, cfg.run_name)}")
