"""ShardLoader: order from (seed, epoch) only, exactly-once across ranks, resize-resume, mixing,
fingerprints and corrupt shards, counted sample by sample on labelled synthetic shards."""
from __future__ import annotations

import collections
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mmrec.data import CorruptShardError, ShardLoader

SIZES = {"text": [7, 5, 9, 3], "code": [6, 8, 4]}  # uneven on purpose


def ids(batch) -> list[tuple[int, int]]:
    """(domain id, sample index) of each row; every token of a labelled row repeats the index."""
    tokens = batch["tokens"]
    assert (tokens[:, 1:] == tokens[:, 1:2]).all(), "a sample was mixed up with another"
    return [(int(row[0]), int(row[1])) for row in tokens]


def global_stream(loaders: list[ShardLoader], steps: int | None = None) -> list[tuple[int, int]]:
    """Run ranks in lockstep and interleave their batches into the global order they read."""
    out = []
    iterators = [iter(loader) for loader in loaders]
    step = 0
    while steps is None or step < steps:
        batches = [next(it, None) for it in iterators]
        if any(b is None for b in batches):
            assert all(b is None for b in batches), "ranks produced different numbers of batches"
            break
        for batch in batches:
            out.extend(ids(batch))
        step += 1
    return out


def make(manifest, world=1, micro=2, **kw) -> list[ShardLoader]:
    kw.setdefault("infinite", False)
    kw.setdefault("domains", ["text"])
    return [ShardLoader(manifest, micro_batch_size=micro, rank=r, world_size=world, **kw)
            for r in range(world)]


def test_order_depends_only_on_seed_and_epoch(labelled_dataset):
    manifest = labelled_dataset(SIZES)
    one = global_stream(make(manifest, world=1, micro=4, seed=3))
    two = global_stream(make(manifest, world=2, micro=2, seed=3))
    four = global_stream(make(manifest, world=4, micro=1, seed=3))
    assert one == two == four
    assert len(set(one)) == len(one) == 24  # 24 text samples, 6 steps of 4, nothing repeated
    assert global_stream(make(manifest, world=1, micro=4, seed=4)) != one
    loader = make(manifest, world=1, micro=4, seed=3)[0]
    loader.epoch = 1
    epoch1 = global_stream([loader])
    assert sorted(epoch1) == sorted(one) and epoch1 != one


def test_each_rank_gets_its_own_slice_and_equal_batches(labelled_dataset):
    manifest = labelled_dataset(SIZES)
    loaders = make(manifest, world=3, micro=2, domains=["code"])
    per_rank = [[sample for batch in loader for sample in ids(batch)] for loader in loaders]
    assert [len(r) for r in per_rank] == [6, 6, 6]  # 18 code samples / (3 ranks * 2)
    everything = [s for r in per_rank for s in r]
    assert len(set(everything)) == 18 and {d for d, _ in everything} == {2}


def test_resume_after_resize_from_two_ranks_to_one_is_exactly_once(labelled_dataset):
    manifest = labelled_dataset(SIZES)
    reference = global_stream(make(manifest, world=1, micro=4, seed=7))
    first = make(manifest, world=2, micro=2, seed=7)
    consumed = global_stream(first, steps=2)
    states = [loader.state_dict() for loader in first]
    assert states[0] == states[1] and states[0]["global_offset"] == 8
    saved = json.loads(json.dumps(states[0]))  # the position must survive a JSON checkpoint

    resumed = make(manifest, world=1, micro=4, seed=7)[0]
    resumed.load_state_dict(saved)
    consumed += global_stream([resumed])
    assert consumed == reference  # same order, no sample repeated, none skipped
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["global_offset"] == 0


def test_resume_from_one_rank_to_three_continues_the_same_order(labelled_dataset):
    manifest = labelled_dataset(SIZES)
    reference = global_stream(make(manifest, world=1, micro=1, seed=1))
    single = make(manifest, world=1, micro=1, seed=1)
    consumed = global_stream(single, steps=5)
    resumed = make(manifest, world=3, micro=1, seed=1)
    for loader in resumed:
        loader.load_state_dict(single[0].state_dict())
    consumed += global_stream(resumed)
    # 24 samples: 5 read alone, then 6 steps of 3; the last sample is the epoch's dropped tail
    assert consumed == reference[:23] and len(set(consumed)) == 23


def test_weighted_mix_and_every_batch_has_both_domains(labelled_dataset):
    manifest = labelled_dataset({"text": [40, 40], "code": [20, 20]})
    loader = make(manifest, micro=4, domains={"text": 0.75, "code": 0.25},
                  every_batch_has_all_domains=True)[0]
    counts = collections.Counter()
    batches = 0
    for batch in loader:
        assert set(batch["domains"]) == {"text", "code"}
        assert [DOMAIN[d] for d in batch["domains"]] == [d for d, _ in ids(batch)]
        counts.update(batch["domains"])
        batches += 1
    assert counts == {"text": 3 * batches, "code": batches} and batches == 26  # text runs out
    with pytest.raises(ValueError, match="every domain in each batch"):
        make(manifest, micro=2, domains={"text": 0.9, "code": 0.1},
             every_batch_has_all_domains=True)


DOMAIN = {"text": 1, "code": 2}


def test_single_domain_stream_and_infinite_iteration(labelled_dataset):
    manifest = labelled_dataset(SIZES)
    loader = ShardLoader(manifest, ["code"], micro_batch_size=6, seed=0)  # infinite by default
    iterator = iter(loader)
    epoch0 = [s for _ in range(3) for s in ids(next(iterator))]
    epoch1_first = ids(next(iterator))
    assert {d for d, _ in epoch0} == {2} and len(set(epoch0)) == 18
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["global_offset"] == 6
    assert epoch1_first != epoch0[:6]


def test_resume_with_different_data_or_settings_is_an_error(labelled_dataset, tmp_path):
    manifest = labelled_dataset(SIZES)
    state = make(manifest)[0].state_dict()
    other = labelled_dataset({"text": [7, 5, 9, 4], "code": [6, 8, 4]})
    with pytest.raises(ValueError, match="another dataset"):
        make(other)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make(manifest, seed=99)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="no code/val samples"):
        ShardLoader(manifest, ["code"], split="val", micro_batch_size=1)


def _truncate(manifest: str, shard: str) -> None:
    path = Path(manifest).parent / shard
    path.write_bytes(path.read_bytes()[:700])


def test_truncated_shard_raises_by_default(labelled_dataset):
    manifest = labelled_dataset(SIZES)
    _truncate(manifest, "text/train/shard-000002.tar")
    with pytest.raises(CorruptShardError, match="shard-000002.tar fails its checksum"):
        for _ in make(manifest, micro=4)[0]:
            pass


def test_truncated_shard_is_skipped_counted_and_ranks_stay_equal(labelled_dataset):
    manifest = labelled_dataset(SIZES)
    _truncate(manifest, "text/train/shard-000002.tar")  # holds text samples 12..20
    seen: list[str] = []
    loaders = make(manifest, world=2, micro=2, on_corrupt="skip",
                   on_corrupt_shard=lambda path, reason: seen.append(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = global_stream(loaders)
    assert len(stream) == 24  # same number of batches as an intact epoch
    assert not any(12 <= index < 21 for _, index in stream)
    assert seen and set(seen) == {"text/train/shard-000002.tar"}
    assert any("corrupt shard" in str(w.message) for w in caught)
    assert all(loader.corrupt_shards == ["text/train/shard-000002.tar"] for loader in loaders)


def test_loader_module_does_not_import_ray():
    code = "import sys, mmrec.data; assert 'ray' not in sys.modules, 'mmrec.data pulled in ray'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
