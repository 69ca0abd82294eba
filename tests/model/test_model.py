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
    for changed in (0, 3, 15, 16, 17, 39):  # first token, inside a chunk, either side of a chunk border, last
        edited = ids.clone()
        edited[:, changed] = (edited[:, changed] + 1) % micro_config.vocab_size
        edited_logits, _ = model(edited, expert=expert)
        assert torch.equal(edited_logits[:, :changed], logits[:, :changed]), f"position < {changed} saw the future"
        assert not torch.allclose(edited_logits[:, changed], logits[:, changed])  # the edit is visible where it should be


def test_memory_carries_information_across_chunks(micro_config):
    """Editing token 2 changes logits far beyond its chunk (through the matrix state), never before it."""
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
            torch.testing.assert_close(got.memory, want.memory, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.conv, want.conv, rtol=1e-5, atol=1e-5)


def _assert_every_parameter_has_gradient(model):
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reaches {missing}"


def test_gradients_reach_every_base_parameter(micro_config):
    base = build_base(micro_config)
    ids = torch.randint(0, micro_config.vocab_size, (2, 25))  # crosses a chunk border: carried state is read
    logits, _ = base(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    _assert_every_parameter_has_gradient(base)


def test_gradients_reach_every_fused_parameter(micro_config):
    model = build_model(micro_config)
    # The correction's output starts at zero, so at step 0 (only) its input layer gets no gradient by
    # construction; after one update it does. Stand in for that update:
    torch.nn.init.normal_(model.fusion.correction_out.weight, std=0.02)
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
    torch.testing.assert_close(sa.layers[-1].memory, sb.layers[-1].memory)
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
    assert all(layer.memory.dtype == torch.float32 for layer in expert_state.layers)


def test_state_norms_follow_the_last_forward(micro_config):
    base = build_base(micro_config)
    with pytest.raises(RuntimeError, match="forward"):
        base.state_norms()
    ids = torch.randint(0, micro_config.vocab_size, (2, 20))
    _, state = base(ids)
    h_norms, memory_norms = base.state_norms()
    for norms in (h_norms, memory_norms):  # detached [L] tensors on the model's device: one host sync for all
        assert isinstance(norms, torch.Tensor) and norms.shape == (micro_config.n_layers,)
        assert not norms.requires_grad and norms.device == base.embedding.weight.device
    for got, layer in zip(memory_norms.tolist(), state.layers):
        assert got == pytest.approx(layer.memory.flatten(1).norm(dim=-1).mean().item(), rel=1e-6)
    for got, layer in zip(h_norms.tolist(), state.layers):  # everything the block carries, taken together
        carried = torch.cat([t.flatten(1) for t in (layer.memory, layer.conv, layer.h) if t is not None], dim=1)
        assert got == pytest.approx(carried.norm(dim=-1).mean().item(), rel=1e-6)
    _, state = base(ids[:, :7])
    assert memory_norms.tolist() != base.state_norms()[1].tolist()  # they follow the latest forward


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_loss_at_step_0_is_at_most_the_mean_of_the_experts(micro_config, seed):
    """Jensen: log(p_text/2 + p_code/2) >= (log p_text + log p_code)/2 on every token, so on any batch."""
    torch.manual_seed(seed)
    model = build_model(micro_config).eval()
    model.experts["text"].embedding.weight.data.mul_(20)  # two different, confident experts
    assert not torch.equal(model.experts["text"].embedding.weight, model.experts["code"].embedding.weight)
    ids = torch.randint(0, micro_config.vocab_size, (3, 33))
    inputs, labels = ids[:, :-1], ids[:, 1:].flatten()
    losses = {}
    for path in ("text", "code", None):
        with torch.no_grad():
            logits, _ = model(inputs, expert=path)
        losses[path] = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels, reduction="none")
    assert abs(losses["text"].mean() - losses["code"].mean()) > 1e-3  # the two experts really differ
    assert (losses[None] <= (losses["text"] + losses["code"]) / 2 + 1e-5).all()
    assert losses[None].mean() <= (losses["text"].mean() + losses["code"].mean()) / 2
    assert (losses[None] <= torch.minimum(losses["text"], losses["code"]) + torch.log(torch.tensor(2.0)) + 1e-5).all()


def test_fused_output_is_a_normalised_log_distribution(micro_config):
    model = build_model(micro_config)
    torch.nn.init.normal_(model.fusion.correction_out.weight, std=1.0)
    torch.nn.init.normal_(model.fusion.gate.weight, std=1.0)
    log_probs, _ = model(torch.randint(0, micro_config.vocab_size, (2, 9)))
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(2, 9), atol=1e-5, rtol=0)
