"""Stage setup from the stage table (what each stage trains, loads and refuses) and streaming generation."""
from __future__ import annotations

import pytest
import torch

import mmrec
from core.config import ConfigError, TrainConfig
from mmrec.train import export_module, generate, prepare_stage, step_fn_for
from mmrec.train.generate import sample_next

CFG = mmrec.get_config("tiny", vocab_size=64, d_model=32, n_layers=2, ffn_dim=64, n_heads=2, seq_len=16)
TRAIN = TrainConfig(seq_len=16, micro_batch_size=2)


def _export(path, module, kind, stage="stage1", cfg=CFG):
    return export_module(path, module, kind=kind, model_config=cfg, stage=stage)


def _trainable(setup):
    return {id(p) for g in setup.param_groups(TRAIN) for p in g["params"]}


def test_stage2_starts_from_base_and_trains_only_its_expert(tmp_path):
    base = prepare_stage("stage1", CFG, TRAIN.replace(seed=7)).model
    base_dir = _export(tmp_path / "base", base, "expert")
    setup = prepare_stage("stage2-code", CFG, TRAIN, init_from=str(base_dir))
    for expert in setup.model.experts.values():
        for name, tensor in expert.state_dict().items():
            assert torch.equal(tensor, base.state_dict()[name]), name
    assert _trainable(setup) == {id(p) for p in setup.model.experts["code"].parameters()}
    assert setup.export_prefix == "experts.code" and setup.stage.export_kind == "expert"
    with pytest.raises(ConfigError, match="stage2-text needs run.init_from"):
        prepare_stage("stage2-text", CFG, TRAIN)
    other = _export(tmp_path / "wide", mmrec.build_base(CFG.replace(ffn_dim=96)), "expert", cfg=CFG.replace(ffn_dim=96))
    with pytest.raises(ConfigError, match=r"another model shape \(ffn_dim: export 96 vs this run 64\)"):
        prepare_stage("stage2-code", CFG, TRAIN, init_from=str(other))


def test_stage3_trains_only_fusion_with_frozen_eval_mode_experts(tmp_path):
    experts = {}
    for seed, domain in enumerate(("text", "code")):
        expert = prepare_stage("stage1", CFG, TRAIN.replace(seed=seed + 1)).model
        experts[domain] = (str(_export(tmp_path / domain, expert, "expert", f"stage2-{domain}")), expert)
    setup = prepare_stage("stage3", CFG, TRAIN, init_from={d: p for d, (p, _) in experts.items()})
    assert _trainable(setup) == {id(p) for p in setup.model.fusion.parameters()}
    for domain, (_, expert) in experts.items():
        loaded = setup.model.experts[domain]
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expert.state_dict().items())
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert setup.model.fusion.training
    full = str(_export(tmp_path / "full", setup.model, "mmrec", "stage3"))
    with pytest.raises(ConfigError, match="to be an expert export"):
        prepare_stage("stage3", CFG, TRAIN, init_from={"text": full, "code": full})


def _greedy_by_reforward(forward, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(forward(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", ["expert", "fused", "text-path"])
@torch.no_grad()
def test_streaming_generation_equals_greedy_full_reforward(kind):
    torch.manual_seed(3)
    if kind == "expert":
        model = mmrec.build_base(CFG).eval()
        step, forward = step_fn_for(model), lambda x: model(x)
    else:
        model = mmrec.build_model(CFG).eval()
        expert = None if kind == "fused" else "text"
        step, forward = step_fn_for(model, expert), lambda x: model(x, expert=expert)
    prompt = torch.randint(0, CFG.vocab_size, (6,)).tolist()
    streamed = generate(step, prompt, 12, temperature=0.0)
    assert streamed == _greedy_by_reforward(forward, prompt, 12)
    # top_k=1 and a tiny top_p are greedy too; seeded sampling is reproducible.
    assert generate(step, prompt, 12, temperature=1.0, top_k=1, seed=0) == streamed
    assert generate(step, prompt, 12, temperature=1.0, top_p=1e-6, seed=0) == streamed
    assert generate(step, prompt, 12, seed=5) == generate(step, prompt, 12, seed=5)
    # Sampling stops at the stop token, which is not returned.
    stop = streamed[3]
    assert generate(step, prompt, 12, temperature=0.0, stop_id=stop) == streamed[:streamed.index(stop)]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {sample_next(logits, temperature=1.0, top_k=None, top_p=0.8, generator=torch.Generator().manual_seed(s))
            for s in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are never drawn
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_next(logits, temperature=1.0, top_k=None, top_p=0.0, generator=None)
