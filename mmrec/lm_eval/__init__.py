"""MM-Rec in EleutherAI's lm-evaluation-harness: the model class "mmrec" for every request type.

    mmrec-lm-eval --model mmrec --model_args export=runs/smoke/stages/stage3/exports/step_00000060 --tasks ...
    python -m mmrec.lm_eval --model mmrec --model_args export=PATH,path=text,batch_size=8,max_length=512 --tasks ...

lm-eval 0.4.x finds models only in its own registry (it reads no entry points), so `mmrec-lm-eval`
(= `python -m mmrec.lm_eval`) imports this module, which registers "mmrec", and then runs lm-eval's
own command line (lm_eval.__main__.cli_evaluate) unchanged: every lm-eval flag works as documented.
In Python, `import mmrec.lm_eval` before `lm_eval.simple_evaluate(model="mmrec", ...)` does the same.
`import mmrec` never imports this module, nor lm_eval.

model_args: export (an export directory, s3:// URL or run:<name>[@best|@latest]; storage_path for
run:), path (fused | text | code for a fused export; an expert export has one path), device (cpu,
cuda[:N], auto; CUDA asked for on a machine without one falls back to the CPU with a warning, since
the harness asks for cuda:0 unless --device is given), batch_size, max_length (tokens per forward chunk; default the export's training seq_len),
max_gen_toks (default 256).

Tokens: the export's own SentencePiece tokenizer (explicit newline pieces), no BOS. Every sequence
starts with the EOS token, as a document does after the previous one's EOS in training, so the first
token of a context (or of a rolling document) is predicted from EOS. Nothing is ever truncated: the
recurrent state is carried across chunks of max_length tokens, so a context or a document of any
length is scored exactly as one long sequence in linear time (loglikelihood_rolling predicts every
token once, from all the tokens before it, not from a window).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import lm_eval.models  # noqa: F401 - the harness's own models first: its registry imports them only while empty
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs

MODEL_NAME = "mmrec"
DEFAULT_MAX_GEN_TOKS = 256
log = logging.getLogger(__name__)


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"mmrec model_args: {name}={value!r} must be a positive integer") from None
    if number < 1:
        raise ValueError(f"mmrec model_args: {name}={value!r} must be a positive integer")
    return number


@register_model(MODEL_NAME)
class MMRecLM(TemplateLM):
    """An MM-Rec export (one expert, or a fused model on one of its paths) as an lm-eval LM."""

    backend = "causal"

    def __init__(self, export: str | None = None, path: str = "fused", device: str | None = "cpu",
                 batch_size: int | str | None = 1, max_length: int | str | None = None,
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, storage_path: str = "",
                 max_batch_size: int | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"mmrec model_args: unknown argument(s) {sorted(unknown)}; known: export, path, device, "
                             "batch_size, max_length, max_gen_toks, storage_path")
        if not export:
            raise ValueError("mmrec model_args: give export=PATH (an export directory, s3:// URL or run:<name>)")
        from mmrec.train.export import open_export
        from mmrec.train.generate import step_fn_for

        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI asks for cuda:0 unless --device is given: run where this machine can.
            log.warning("mmrec: device %s was asked for, but this machine has no CUDA device; using the CPU", device)
            device = "cpu"
        loaded = open_export(str(export), storage_path=storage_path, device="auto" if device == "auto" else "cpu")
        self.model = loaded.model.to(device if device != "auto" else loaded.device)
        self._device = next(self.model.parameters()).device
        self.mmrec_tokenizer = loaded.tokenizer
        self.export = loaded.export
        fused = loaded.export.kind == "mmrec"
        if fused and path not in ("fused", "text", "code"):
            raise ValueError(f"mmrec model_args: path={path!r}: a fused export has the paths fused, text, code")
        if not fused and path not in ("fused", "expert", None, ""):
            raise ValueError(f"mmrec model_args: path={path!r}: {export} is a single expert (kind 'expert'); "
                             "path applies to a fused (stage-3) export")
        self.path = path if fused else "expert"
        self._step: Callable = step_fn_for(self.model, None if self.path in ("fused", "expert") else self.path)
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = max_batch_size or 8  # no probing: rows cost the same on every request type
        self._batch_size = _positive_int("batch_size", batch_size if batch_size is not None else 1)
        self._max_length = _positive_int("max_length", max_length or loaded.export.model_config.seq_len)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> "MMRecLM":
        # The harness passes its own batch_size (1 unless --batch_size) and device beside model_args;
        # a value given in model_args wins instead of being a duplicate keyword.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> "MMRecLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # --- what the harness asks of a TemplateLM ------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.mmrec_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.mmrec_tokenizer.eos_id  # no BOS: a document starts after EOS, as in training

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"mmrec-sentencepiece-{self.mmrec_tokenizer.sha256[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.mmrec_tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.mmrec_tokenizer.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        return {"mmrec_export": str(self.export.directory), "mmrec_kind": self.export.kind, "mmrec_path": self.path,
                "mmrec_stage": self.export.info.get("stage"), "mmrec_step": self.export.info.get("step")}

    # --- scoring --------------------------------------------------------------------------------------

    def _with_start(self, tokens: list[int]) -> list[int]:
        return tokens if tokens[:1] == [self.eot_token_id] else [self.eot_token_id, *tokens]

    @torch.no_grad()
    def score_tokens(self, sequences: Sequence[Sequence[int]], first_scored: Sequence[int],
                     disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """For each token sequence s: (sum of log p(s[t] | s[:t]) over t >= first_scored, whether each of
        those tokens is the greedy choice). Rows are batched (longest first, right-padded: padding
        after a row's end never reaches its positions) and run in chunks of max_length tokens with the
        recurrent state carried, so any length is exact and linear in time."""
        from tqdm import tqdm

        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(sequences)
        pad = self.eot_token_id
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, disable=disable_tqdm, desc="mmrec scoring"):
            length = len(sequences[batch[0]]) - 1  # predictions of the longest row
            if length < 1:
                raise ValueError("a sequence to score needs at least 2 tokens (the start token and one more)")
            ids = torch.full((len(batch), length + 1), pad, dtype=torch.long)
            scored = torch.zeros((len(batch), length), dtype=torch.bool)  # over target positions 1..length
            for row, index in enumerate(batch):
                sequence = sequences[index]
                if not 1 <= first_scored[index] <= len(sequence):
                    raise ValueError(f"first_scored {first_scored[index]} is outside [1, {len(sequence)}]")
                ids[row, :len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
                scored[row, first_scored[index] - 1:len(sequence) - 1] = True
            ids = ids.to(self.device)
            logprob = torch.zeros(len(batch), dtype=torch.float64)
            greedy = torch.ones(len(batch), dtype=torch.bool)
            state = None
            for start in range(0, length, self.max_length):
                end = min(start + self.max_length, length)
                logits, state = self._step(ids[:, start:end], state)
                targets = ids[:, start + 1:end + 1]
                token_logprob = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                mask = scored[:, start:end]
                logprob += (token_logprob.double().cpu() * mask).sum(1)
                greedy &= ((logits.argmax(-1) == targets).cpu() | ~mask).all(1)
            for row, index in enumerate(batch):
                results[index] = (float(logprob[row]), bool(greedy[row]))
        return results

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(context, continuation) pairs, tokenized by TemplateLM: the continuation's log-probability after
        EOS + the whole context (never truncated)."""
        sequences, first = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("an empty continuation has no tokens to score")
            start = self._with_start(list(context))
            sequences.append(start + list(continuation))
            first.append(len(start))
        results = self.score_tokens(sequences, first, disable_tqdm=disable_tqdm)
        for (pair, _, _), result in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-likelihood: EOS + its tokens as one sequence, every token scored once
        from everything before it (chunks of max_length with the state carried)."""
        strings = [request.args[0] for request in requests]
        sequences = [[self.eot_token_id, *self.tok_encode(string)] for string in strings]
        results = [0.0] * len(sequences)
        nonempty = [i for i, sequence in enumerate(sequences) if len(sequence) > 1]
        scores = self.score_tokens([sequences[i] for i in nonempty], [1] * len(nonempty), disable_tqdm=disable_tqdm)
        for i, (logprob, _) in zip(nonempty, scores):
            results[i] = logprob
        for string, logprob in zip(strings, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), logprob)
        return results

    # --- generation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _prefill(self, tokens: list[int]) -> tuple[torch.Tensor, Any]:
        """The logits after the last token and the state, the prompt run in chunks of max_length."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        state = None
        for start in range(0, len(tokens), self.max_length):
            logits, state = self._step(ids[:, start:start + self.max_length], state)
        return logits[0, -1], state

    @torch.no_grad()
    def generate_text(self, context: str, *, until: Sequence[str], max_gen_toks: int, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float = 1.0, generator: torch.Generator | None = None) -> str:
        """The continuation of `context` (EOS + its tokens), one token at a time from the carried state
        (mmrec.train.generate's sampler), cut before the first stop string; stops at EOS too."""
        from mmrec.train.generate import sample_next

        logits, state = self._prefill(self._with_start(self.tok_encode(context)))
        out: list[int] = []
        text = ""
        while len(out) < max_gen_toks:
            token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if token == self.eot_token_id:
                break
            out.append(token)
            text = self.tok_decode(out)
            if any(stop in text for stop in until) or len(out) == max_gen_toks:
                break
            step_logits, state = self._step(torch.tensor([[token]], dtype=torch.long, device=self.device), state)
            logits = step_logits[0, -1]
        cut = min((text.find(stop) for stop in until if stop and stop in text), default=len(text))
        return text[:cut]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="mmrec generating"):
            context, raw = request.args
            kwargs = normalize_gen_kwargs(dict(raw or {}), default_max_gen_toks=self.max_gen_toks)
            until = [stop for stop in kwargs.pop("until") if stop]
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            greedy = not kwargs.pop("do_sample", False)
            temperature = 0.0 if greedy else float(kwargs.pop("temperature", 1.0))
            kwargs.pop("temperature", None)
            top_k = kwargs.pop("top_k", None)
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            if kwargs:
                log.warning("mmrec ignores the generation arguments %s", sorted(kwargs))
            text = self.generate_text(context, until=until, max_gen_toks=max_gen_toks, temperature=temperature,
                                      top_k=int(top_k) if top_k else None, top_p=top_p)
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, raw), text)
        return results


def main() -> None:
    """`mmrec-lm-eval ...` = `lm_eval ...` with the "mmrec" model registered (lm-eval's own CLI, unchanged)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
