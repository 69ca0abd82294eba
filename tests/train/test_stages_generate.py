"""Stage preparation (what each stage trains and loads) and streaming generation."""
from __future__ import annotations

import pytest
import torch

import mmrec
from mmrec.train import ByteTokenizer, build_from_export, generate, prepare_stage, read_export, step_fn_for
from mmrec.train.export import export_weights


def _export(path, module, kind, cfg, stage="stage1"):
    return export_weights(path, module, kind=kind, model_config=cfg, stage=stage, step=0)


def test_stage2_starts_from_base_and_trains_only_its_expert(model_cfg, train_cfg, tmp_path):
    base = prepare_stage("stage1", model_cfg, train_cfg.replace(seed=7)).model
    base_dir = _export(tmp_path / "base", base, "expert", model_cfg)
    setup = prepare_stage("stage2-code", model_cfg, train_cfg, init_from=base_dir)
    for expert in setup.model.experts.values():
        for name, tensor in expert.state_dict().items():
            assert torch.equal(tensor, base.state_dict()[name]), name
    trainable = {id(p) for g in setup.param_groups for p in g["params"]}
    assert trainable == {id(p) for p in setup.model.experts["code"].parameters()}
    assert setup.export_module is setup.model.experts["code"] and setup.export_kind == "expert"
    with pytest.raises(ValueError, match="stage2-text needs init_from"):
        prepare_stage("stage2-text", model_cfg, train_cfg)


def test_stage3_trains_only_fusion_with_frozen_eval_mode_experts(model_cfg, train_cfg, tmp_path):
    experts = {}
    for seed, domain in enumerate(("text", "code")):
        expert = prepare_stage("stage1", model_cfg, train_cfg.replace(seed=seed + 1)).model
        experts[domain] = (_export(tmp_path / domain, expert, "expert", model_cfg, f"stage2-{domain}"), expert)
    setup = prepare_stage("stage3", model_cfg, train_cfg, init_from={d: p for d, (p, _) in experts.items()})
    trainable = {id(p) for g in setup.param_groups for p in g["params"]}
    assert trainable == {id(p) for p in setup.model.fusion.parameters()}
    for domain, (_, expert) in experts.items():
        loaded = setup.model.experts[domain]
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expert.state_dict().items())
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert setup.model.fusion.training
    full = _export(tmp_path / "full", setup.model, "mmrec", model_cfg, "stage3")
    with pytest.raises(ValueError, match="as an expert export"):
        prepare_stage("stage3", model_cfg, train_cfg, init_from={"text": full, "code": full})


def _greedy_by_reforward(forward, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(forward(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", ["expert", "fused", "text-path"])
@torch.no_grad()
def test_streaming_generation_equals_greedy_full_reforward(model_cfg, kind):
    torch.manual_seed(3)
    if kind == "expert":
        model = mmrec.build_base(model_cfg).eval()
        step, forward = step_fn_for(model), lambda x: model(x)
    else:
        model = mmrec.build_model(model_cfg).eval()
        expert = None if kind == "fused" else "text"
        step, forward = step_fn_for(model, expert), lambda x: model(x, expert=expert)
    prompt = torch.randint(0, model_cfg.vocab_size, (6,)).tolist()  # generation crosses a memory segment (8)
    streamed = generate(step, prompt, 5, temperature=0.0)
    assert streamed == _greedy_by_reforward(forward, prompt, 5)
    # top_k=1 sampling is greedy too, and seeded sampling is reproducible.
    assert generate(step, prompt, 5, temperature=1.0, top_k=1, seed=0) == streamed
    assert generate(step, prompt, 5, seed=5) == generate(step, prompt, 5, seed=5)


def test_generate_cli_reads_export_and_tokenizer(model_cfg, tmp_path, capsys):
    from launchers.generate import main

    cfg = model_cfg.replace(vocab_size=256)
    tokenizer_file = ByteTokenizer().save(tmp_path)
    export = export_weights(tmp_path / "final", mmrec.build_model(cfg), kind="mmrec", model_config=cfg,
                            stage="stage3", step=5, tokenizer_file=tokenizer_file)
    assert main(["--checkpoint", str(export), "--prompt", "def f", "--max-new-tokens", "7",
                 "--expert", "code", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    model = build_from_export(read_export(export))
    expected = generate(step_fn_for(model, "code"), list(b"def f"), 7, temperature=0.0)
    assert printed == "def f" + ByteTokenizer().decode(expected) + "\n"
    (tmp_path / "final" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer beside the export"):
        main(["--checkpoint", str(export), "--prompt", "x", "--max-new-tokens", "1"])
