"""Saving and loading recurrent states: round trip, exact continuation, atomic writes."""
import os

import pytest
import torch

from mmrec import MMRecState, build_base, build_model, load_state, save_state


def test_round_trip_and_continuation_equal_the_live_state(micro_config, tmp_path):
    model = build_model(micro_config).eval()
    ids = torch.randint(0, micro_config.vocab_size, (2, 30))
    _, live = model(ids[:, :13])  # ends mid-chunk, and the convolution's tail is part of the state
    path = tmp_path / "session.pt"
    save_state(live, path)
    loaded = load_state(path)
    assert isinstance(loaded, MMRecState)
    for name in ("text", "code"):
        for a, b in zip(getattr(live, name).layers, getattr(loaded, name).layers):
            assert a.position == b.position == 13
            assert torch.equal(a.memory, b.memory) and torch.equal(a.conv, b.conv)
    # the file is plain tensors and ints: loadable by a reader that trusts no pickled classes
    torch.load(path, weights_only=True)
    for expert in ("text", "code", None):
        want, _ = model(ids[:, 13:], expert=expert, state=live)
        got, _ = model(ids[:, 13:], expert=expert, state=loaded)
        assert torch.equal(got, want)


def test_expert_state_round_trip_and_detach(micro_config, tmp_path):
    base = build_base(micro_config)
    ids = torch.randint(0, micro_config.vocab_size, (1, 11))
    _, state = base(ids)
    assert state.layers[0].memory.requires_grad and state.layers[0].conv.requires_grad
    detached = state.detach()
    assert not any(t.requires_grad for layer in detached.layers for t in (layer.memory, layer.conv))
    save_state(state, tmp_path / "s.pt")
    again = load_state(tmp_path / "s.pt")
    assert type(again).__name__ == "ExpertState" and torch.equal(again.layers[1].memory, state.layers[1].memory)


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(micro_config, tmp_path, monkeypatch):
    # A write that dies half way (disk full, killed process) cannot be produced on demand by a real
    # filesystem, so torch.save is replaced by one that writes part of the file and then fails.
    base = build_base(micro_config)
    _, state = base(torch.randint(0, micro_config.vocab_size, (1, 5)))
    path = tmp_path / "s.pt"
    save_state(state, path)
    before = path.read_bytes()

    def torn_save(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space"):
        save_state(state, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["s.pt"]


def test_load_rejects_a_foreign_file(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a state written by mmrec.save_state"):
        load_state(tmp_path / "other.pt")
