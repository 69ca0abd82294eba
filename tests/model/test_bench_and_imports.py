"""The benchmark's baseline is a fair causal transformer; `import mmrec` stays light."""
import subprocess
import sys

import torch

from mmrec import build_base, count_parameters
from benchmarks.model import TransformerBaseline


def test_baseline_transformer_is_causal_and_same_width(micro_config):
    baseline = TransformerBaseline(micro_config).eval()
    ids = torch.randint(0, micro_config.vocab_size, (2, 20))
    logits, _ = baseline(ids)
    edited = ids.clone()
    edited[:, 11] = (edited[:, 11] + 1) % micro_config.vocab_size
    edited_logits, _ = baseline(edited)
    assert torch.equal(edited_logits[:, :11], logits[:, :11])
    assert not torch.allclose(edited_logits[:, 11:], logits[:, 11:])
    # Same embedding, FFN and norms; only the mixer differs (attention 4D^2 vs the memory's 5D^2 + gates + conv).
    assert baseline.embedding.weight.shape == build_base(micro_config).embedding.weight.shape
    assert count_parameters(baseline) < count_parameters(build_base(micro_config))


def test_import_mmrec_loads_no_cluster_or_data_libraries():
    code = "import sys, mmrec; print(' '.join(m for m in ('ray', 'deepspeed', 'webdataset', 'sentencepiece', 'boto3') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"import mmrec pulled in {done.stdout.strip()}"


def test_flops_per_token_matches_counted_matmul_flops():
    """The MFU helper's formula against torch's own FLOP counter over a real forward + backward.

    The counter sees every matmul, SDPA and einsum (the delta rule's chunked forward and hand-written
    backward included); the formula leaves out the small elementwise work, so they agree to within 10 %.
    The models run in float64 so that the delta rule takes the chunk path, whose matmuls the counter
    sees (the fp32 CPU C kernel, kernels/delta/fused_recurrent.c, is opaque to it).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from mmrec import build_model, get_config

    config = get_config("tiny", vocab_size=512)
    T = 256
    ids = torch.randint(0, config.vocab_size, (1, T))
    for model, kwargs in ((build_base(config).double(), {}), (build_model(config).double(), {"expert": None})):
        with FlopCounterMode(display=False) as counter:
            logits, _ = model(ids, **kwargs)
            logits.sum().backward()
        counted = counter.get_total_flops() / T
        assert abs(model.flops_per_token(T) - counted) < 0.1 * counted, (model.flops_per_token(T), counted)


def test_transformer_flops_per_token_matches_counted_flops():
    """The baseline's MFU formula (projections, tied head, causal attention's 2 T D per layer) against
    torch's FLOP counter, with SDPA on its math backend so that the counter sees attention's matmuls
    (it does not count the CPU flash kernel). The math backend computes the full T x T square, the
    formula charges the causal half, so half the square's FLOPs are taken off before comparing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mmrec import get_config

    config = get_config("tiny", vocab_size=512)
    T, D, L = 256, config.d_model, config.n_layers
    model = TransformerBaseline(config)
    ids = torch.randint(0, config.vocab_size, (1, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits, _ = model(ids)
        logits.sum().backward()
    attention_square = 3 * L * 4 * T * T * D  # fwd + bwd of Q K^T and A V over the full square
    assert counter.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0) >= attention_square  # attention was seen
    counted = (counter.get_total_flops() - attention_square / 2) / T
    assert abs(model.flops_per_token(T) - counted) < 0.05 * counted, (model.flops_per_token(T), counted)
