"""A 32K-token forward of `small` on CPU must not allocate anything O(T^2).

Peak memory is read from the operating system (ru_maxrss of a fresh child process), so it counts
every allocation torch makes, not only Python objects. The head is left out on purpose: its
[T, V] logits (1 GiB at V = 8192) are linear in T and would only blur the bound on the blocks.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

T = 32_768
_CHILD = textwrap.dedent(
    f"""
    import json, resource, time, torch
    from mmrec import build_base
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = build_base("small").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, {T}))
    with torch.inference_mode():  # warm up allocator and kernels on a short input
        model.features(ids[:, :300])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.inference_mode():
        features, state = model.features(ids)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(peak_growth=after - before, seconds=time.perf_counter() - start,
                          shape=list(features.shape), finite=bool(torch.isfinite(features).all()),
                          position=state.position, heads=model.config.n_heads)))
    """
)


@pytest.mark.slow
def test_32k_forward_of_small_stays_linear_in_memory():
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _CHILD], cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["shape"] == [1, T, 256] and report["finite"] and report["position"] == T
    quadratic = T * T * 4 * report["heads"]  # one fp32 score matrix per head: 16 GiB
    # Linear work is about 1.2 GiB: the FFN's [T, 2 * 1024] fp32 activation alone is 256 MiB, the
    # [T, 4D] input projection 128 MiB, plus scan and memory temporaries. 2 GiB is an eighth of one
    # quadratic score matrix set, so any T x T allocation fails this.
    assert report["peak_growth"] < 2 * 2**30, f"peak grew by {report['peak_growth'] / 2**20:.0f} MiB"
    assert report["peak_growth"] < quadratic / 8
