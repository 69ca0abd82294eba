"""Experts and the fused model: causality, chunked = whole, gradients, checkpointing, init from base, bf16."""
import pytest
import torch

from mmrec import ExpertState, MMRecState, build_base, build_model

PATHS = ["text", "code", None]


def _run(model, ids, expert, state=None):
    return model(ids, expert=expert, state=state)


@pytest.mark.parametrize("expert", PATHS)
def test_causal_on_every_path(micro_config, expert):
    model = build_model(micro_config).eval()
    ids = torch.randint(0, micro_config.vocab_size, (2, 40))
    logits, _ = model(ids, expert=expert)
    for changed in (3, 8, 17, 39):  # inside a segment, on a border, later segments
        edited = ids.clone()
        edited[:, changed] = (edited[:, changed] + 1) % micro_config.vocab_size
        edited_logits, _ = model(edited, expert=expert)
        assert torch.equal(edited_logits[:, :changed], logits[:, :changed]), f"position < {changed} saw the future"
        assert not torch.allclose(edited_logits[:, changed], logits[:, changed])  # the edit is visible where it should be


def test_memory_carries_information_across_segments(micro_config):
    """Editing segment 0 changes logits far beyond it (through h and the memory), never before it."""
    model = build_base(micro_config).eval()
    ids = torch.randint(0, micro_config.vocab_size, (1, 40))
    edited = ids.clone()
    edited[:, 2] = (edited[:, 2] + 5) % micro_config.vocab_size
    a, _ = model(ids)
    b, _ = model(edited)
    assert torch.equal(a[:, :2], b[:, :2])
    assert (a[:, 32:] - b[:, 32:]).abs().max() > 1e-6


@pytest.mark.parametrize("expert", PATHS)
@pytest.mark.parametrize("borders", [[13], [5, 19], [3, 6], [8, 16, 27]])
def test_chunked_equals_whole(micro_config, expert, borders):
    model = build_model(micro_config).eval()
    ids = torch.randint(0, micro_config.vocab_size, (2, 40))
    whole, whole_state = model(ids, expert=expert)
    pieces, state = [], None
    for start, stop in zip([0, *borders], [*borders, 40]):
        logits, state = model(ids[:, start:stop], expert=expert, state=state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-5, atol=1e-5)
    for name in ("text", "code") if expert is None else (expert,):
        for got, want in zip(getattr(state, name).layers, getattr(whole_state, name).layers):
            assert got.position == want.position == 40
            for field in ("h", "memory", "write_max", "write_norm", "write_sum"):
                torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5)


def _assert_every_parameter_has_gradient(model):
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reaches {missing}"


def test_gradients_reach_every_base_parameter(micro_config):
    base = build_base(micro_config)
    ids = torch.randint(0, micro_config.vocab_size, (2, 25))  # crosses 3 segment borders: writes are read
    logits, _ = base(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    _assert_every_parameter_has_gradient(base)


def test_gradients_reach_every_fused_parameter(micro_config):
    model = build_model(micro_config)
    ids = torch.randint(0, micro_config.vocab_size, (2, 25))
    logits, _ = model(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    _assert_every_parameter_has_gradient(model)


def test_gradient_checkpointing_gives_same_outputs_states_and_gradients(micro_config):
    plain = build_base(micro_config)
    ckpt = build_base(micro_config)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing = True
    ids = torch.randint(0, micro_config.vocab_size, (2, 20))
    results = []
    for model in (plain, ckpt):
        logits, state = model(ids)
        (logits.square().mean() + state.layers[-1].memory.sum()).backward()  # the state must carry gradients too
        results.append((logits, state, {n: p.grad for n, p in model.named_parameters()}))
    (la, sa, ga), (lb, sb, gb) = results
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(sa.layers[-1].h, sb.layers[-1].h)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], msg=name)


def test_init_experts_from_base_copies_weights(micro_config):
    base = build_base(micro_config)
    model = build_model(micro_config)
    model.init_experts_from_base(base.state_dict())
    ids = torch.randint(0, micro_config.vocab_size, (1, 12))
    for name in ("text", "code"):
        for key, value in base.state_dict().items():
            assert torch.equal(model.experts[name].state_dict()[key], value), f"{name}.{key}"
        torch.testing.assert_close(model(ids, expert=name)[0], base(ids)[0])
    # the experts own their copies: training one must not move the other or the base
    with torch.no_grad():
        model.experts["text"].embedding.weight.add_(1.0)
    assert torch.equal(model.experts["code"].embedding.weight, base.embedding.weight)


def test_init_experts_from_base_rejects_a_different_shape(micro_config):
    base = build_base(micro_config, n_layers=3)
    with pytest.raises(ValueError, match="does not fit expert 'text'"):
        build_model(micro_config).init_experts_from_base(base.state_dict())


@pytest.mark.parametrize("expert", PATHS)
def test_bf16_autocast_forward_is_finite_and_close(micro_config, expert):
    model = build_model(micro_config).eval()
    ids = torch.randint(0, micro_config.vocab_size, (2, 24))
    reference, _ = model(ids, expert=expert)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(ids, expert=expert)
    assert torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max() + 1e-3
    expert_state = state.text if expert in ("text", None) else state.code
    assert all(layer.h.dtype == torch.float32 for layer in expert_state.layers)


def test_state_norms_follow_the_last_forward(micro_config):
    base = build_base(micro_config)
    with pytest.raises(RuntimeError, match="forward"):
        base.state_norms()
    ids = torch.randint(0, micro_config.vocab_size, (2, 20))
    _, state = base(ids)
    h_norms, memory_norms = base.state_norms()
    assert len(h_norms) == len(memory_norms) == micro_config.n_layers
    for got, layer in zip(h_norms, state.layers):
        assert got == pytest.approx(layer.h.norm(dim=-1).mean().item(), rel=1e-6)
    for got, layer in zip(memory_norms, state.layers):
        assert got == pytest.approx(layer.memory.flatten(1).norm(dim=-1).mean().item(), rel=1e-6)


def test_bad_inputs_get_clear_errors(micro_config):
    model = build_model(micro_config)
    ids = torch.randint(0, micro_config.vocab_size, (2, 10))
    with pytest.raises(ValueError, match="expert must be one of"):
        model(ids, expert="math")
    with pytest.raises(ValueError, match="LongTensor"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model(ids + micro_config.vocab_size)
    _, state = model(ids, expert="text")
    with pytest.raises(ValueError, match="batch size 2"):
        model(ids[:1], expert="text", state=state)
    with pytest.raises(TypeError, match="MMRecState"):
        model(ids, state=state.text)
    assert isinstance(state, MMRecState) and isinstance(state.text, ExpertState) and state.code is None
