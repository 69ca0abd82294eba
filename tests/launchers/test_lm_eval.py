"""The lm-evaluation-harness adapter (mmrec.lm_eval), offline: task YAMLs of ours over local JSONL files,
run through lm-eval's real command line (python -m mmrec.lm_eval = lm_eval's CLI with "mmrec"
registered), checked against launchers.eval and our own scoring of the same tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mmrec
from datasets_prep.tokenizer_training import train_tokenizer
from mmrec.train.export import export_module
from mmrec.train.generate import generate, step_fn_for

ROOT = Path(__file__).resolve().parents[2]
CORPUS = [
    "The river runs past the old mill, and the miller counts his sacks of grain every morning.\n"
    "def count(sacks):\n    return sum(1 for sack in sacks if sack.full)\n",
    "A quiet town keeps its records in a ledger; each page lists the harvest, the rain and the price of bread.",
    "for i in range(10):\n    print(i * i)\n# squares of the first ten numbers\n",
    "Stars rise over the hills at night while the shepherds light small fires and tell long stories.",
] * 3
# Longer than the adapter's max_length below, so the harness scores it in chunks through the state.
DOCUMENT = ("The miller counts the sacks of grain by the river.\n"
            "def mill(grain):\n    return [g for g in grain if g]\n"
            "At night the town keeps its ledger of rain and bread.")
OTHER_DOCUMENT = "Shepherds tell stories by small fires."
MAX_LENGTH = 16
MC_DOCS = [
    {"question": "The miller counts the", "choices": [" sacks", " stars", " ledger"], "label": 0},
    {"question": "def count(sacks):\n    return", "choices": [" sum", " print", " fires"], "label": 0},
]
PROMPT = "The river runs past the"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a CPU shared with other runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A fused export (random tiny weights, its own tokenizer) whose seq_len makes DOCUMENT exactly one
    row of launchers.eval's packing, and the task folder with three tasks."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = train_tokenizer(CORPUS, vocab_size=320, num_threads=1)
    (root / "tokenizer.model").write_bytes(tokenizer.model_bytes)
    n = len(tokenizer.encode(DOCUMENT))
    assert n > 2 * MAX_LENGTH
    prompt = [tokenizer.eos_id, *tokenizer.encode(PROMPT)]
    for seed in range(20):
        torch.manual_seed(seed)
        # packed row = seq_len + 1 tokens = the document (its closing EOS is the dropped tail)
        model = mmrec.build_model("tiny", vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, ffn_dim=64,
                                  n_heads=4, chunk_size=16, seq_len=n - 1).eval()
        # The stop string of the generation task: two printable ASCII characters of what greedy decoding
        # gives unconstrained (random weights: take a seed whose output has them after its first token
        # and decodes token by token into prefixes of itself).
        with torch.no_grad():
            ids = generate(step_fn_for(model), prompt, 12, temperature=0.0, stop_id=tokenizer.eos_id)
        free = tokenizer.decode(ids)
        start = len(tokenizer.decode(ids[:1]))
        windows = [i for i in range(start, len(free) - 1)
                   if free[i:i + 2].isascii() and free[i:i + 2].isprintable() and free[i:i + 2].strip()]
        if windows and all(free.startswith(tokenizer.decode(ids[:k])) for k in range(1, len(ids) + 1)):
            break
    else:
        pytest.fail("no seed gave a usable greedy continuation")
    stop = free[windows[0]:windows[0] + 2]
    export = export_module(root / "export", model, kind="mmrec", model_config=model.config, stage="stage3",
                           tokenizer_file=root / "tokenizer.model")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (DOCUMENT, OTHER_DOCUMENT)))
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tasks / "gen.jsonl").write_text(json.dumps({"prompt": PROMPT, "answer": free[:free.find(stop)]}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"

    def files(name: str) -> str:
        return f"dataset_kwargs:\n  data_files:\n    test: {tasks / name}\n  cache_dir: {root / 'hf-datasets'}\n"

    (tasks / "mmrec_ppl.yaml").write_text(
        "task: mmrec_ppl\n" + common + files("docs.jsonl") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (tasks / "mmrec_mc.yaml").write_text(
        "task: mmrec_mc\n" + common + files("mc.jsonl") + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    (tasks / "mmrec_gen.yaml").write_text(
        "task: mmrec_gen\n" + common + files("gen.jsonl") + "output_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        f"generation_kwargs:\n  until: [{json.dumps(stop)}]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return SimpleNamespace(root=root, tasks=tasks, export=export, model=model, tokenizer=tokenizer, n=n,
                           free=free, stop=stop)


def offline_env(root: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf-home"),
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def harness(setup):
    """One run of lm-eval's own CLI over the three tasks: its per-document samples, by task."""
    out = setup.root / "harness-out"
    command = [sys.executable, "-m", "mmrec.lm_eval", "--model", "mmrec",
               "--model_args", f"export={setup.export},path=fused,max_length={MAX_LENGTH},batch_size=2",
               "--tasks", "mmrec_ppl,mmrec_mc,mmrec_gen", "--include_path", str(setup.tasks),
               "--output_path", str(out), "--log_samples", "--device", "cpu"]
    done = subprocess.run(command, cwd=setup.root, env=offline_env(setup.root), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    samples = {}
    for task in ("mmrec_ppl", "mmrec_mc", "mmrec_gen"):
        [path] = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    [results] = out.rglob("results_*.json")
    return SimpleNamespace(samples=samples, results=json.loads(results.read_text())["results"], stdout=done.stdout)


def test_rolling_perplexity_agrees_with_launchers_eval(setup, harness, tmp_path):
    from launchers import eval as eval_cli

    by_text = {s["doc"]["text"]: float(s["filtered_resps"][0]) for s in harness.samples["mmrec_ppl"]}
    harness_nats = -by_text[DOCUMENT] / setup.n
    data = tmp_path / "document.jsonl"
    data.write_text(json.dumps({"text": DOCUMENT}) + "\n")
    table_file = tmp_path / "table.json"
    assert eval_cli.main(["--export", str(setup.export), "--data", str(data), "--json", str(table_file),
                          "--device", "cpu"]) == 0
    table = json.loads(table_file.read_text())["table"]
    ours = table["fused"]["text"]
    assert ours["tokens"] == setup.n  # every token of the document, the first predicted from EOS
    print(f"\nnats/token on the document: launchers.eval {ours['loss']:.8f}, lm-eval (chunks of {MAX_LENGTH}) "
          f"{harness_nats:.8f}, |diff| {abs(ours['loss'] - harness_nats):.2e}")
    assert abs(ours["loss"] - harness_nats) < 1e-4
    # The harness's own perplexity figures come from the same numbers.
    words = len(DOCUMENT.split()) + len(OTHER_DOCUMENT.split())
    total = sum(by_text.values())
    assert harness.results["mmrec_ppl"]["word_perplexity,none"] == pytest.approx(torch.tensor(-total / words).exp().item(),
                                                                                 rel=1e-6)


def test_chunked_rolling_equals_one_shot_and_loglikelihood_matches_our_scoring(setup, harness):
    from mmrec.lm_eval import MMRecLM

    chunked = MMRecLM(export=str(setup.export), max_length=MAX_LENGTH, batch_size=2)
    one_shot = MMRecLM(export=str(setup.export), max_length=4096)
    requests = [SimpleNamespace(args=(DOCUMENT,)), SimpleNamespace(args=(OTHER_DOCUMENT,))]
    for a, b in zip(chunked.loglikelihood_rolling(requests), one_shot.loglikelihood_rolling(requests)):
        assert a == pytest.approx(b, abs=1e-4 * setup.n)
    ids = [setup.tokenizer.eos_id, *setup.tokenizer.encode(DOCUMENT)]
    with torch.no_grad():
        logits = setup.model(torch.tensor([ids[:-1]]))[0][0]
    direct = float(F.log_softmax(logits.double(), -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    assert chunked.loglikelihood_rolling(requests[:1])[0] == pytest.approx(direct, abs=1e-4 * setup.n)
    # Multiple choice: each choice's log-likelihood from the harness = our forward over EOS + context + choice.
    tokenizer = setup.tokenizer
    for sample in harness.samples["mmrec_mc"]:
        doc = sample["doc"]
        for choice, response in zip(doc["choices"], sample["resps"]):
            context = tokenizer.encode(doc["question"])
            whole = tokenizer.encode(doc["question"] + choice)
            continuation = whole[len(context):]
            sequence = [tokenizer.eos_id, *context, *continuation]
            with torch.no_grad():
                logits = setup.model(torch.tensor([sequence[:-1]]))[0][0]
            logprobs = F.log_softmax(logits.double(), -1)
            expected = sum(float(logprobs[len(context) + i, token]) for i, token in enumerate(continuation))
            got = float(response[0][0])
            assert got == pytest.approx(expected, abs=1e-4 * len(continuation)), (doc["question"], choice)
    assert 0.0 <= harness.results["mmrec_mc"]["acc,none"] <= 1.0


def test_generate_until_stops_at_the_stop_string(setup, harness):
    [sample] = harness.samples["mmrec_gen"]
    expected = setup.free[:setup.free.find(setup.stop)]
    assert sample["resps"][0][0] == expected and setup.stop not in expected
    assert "exact_match,none" in harness.results["mmrec_gen"]
    from mmrec.lm_eval import MMRecLM

    lm = MMRecLM(export=str(setup.export), path="text")
    [short] = lm.generate_until([SimpleNamespace(args=(PROMPT, {"until": [], "max_gen_toks": 3}))])
    assert len(setup.tokenizer.encode(short)) <= 3
