"""memzoo LMs in the lm-evaluation-harness: the model class "memzoo" and offline tasks.

    memzoo eval lm-eval --checkpoint runs/demo --tasks memzoo_passkey,memzoo_mqar

or from Python::

    model = MemzooLM.from_checkpoint("runs/demo")
    results = evaluate_tasks(model, ["memzoo"], data_dir="runs/demo/lm_eval_data")

`MemzooLM` answers lm-eval's three request types for an `LM` and its tokenizer; every text is
scored after the tokenizer's <eos>, which is how documents start in memzoo's training stream.

- loglikelihood((context, continuation)): the summed log-probability of the continuation's
  tokens and whether greedy decoding would produce all of them. As lm-eval does, the pair is
  encoded whole and split where the context's own encoding ends (what BPE merges across the
  boundary goes to the continuation).
- loglikelihood_rolling((text,)): the log-probability of every token of the text, each predicted
  once, in windows of at most max_length inputs (one window when max_length is None).
- generate_until((context, {"until": [...], "max_gen_toks": n})): greedy decoding, cut at the
  first stop string or <eos>. Sampling options are refused; others (top_p ...) mean nothing to
  greedy decoding and are ignored.

Sequences of equal length share a batch and nothing is padded, so a batched score equals the
score of the sequence alone for every mixer (routers and non-causal prefixes included).
lm-eval itself (`pip install memzoo[eval]`) is imported only by `harness_model_class` and
`evaluate_tasks`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from memzoo.models.lm import LM
from memzoo.train.pretrained import load_trained_lm

__all__ = ["MemzooLM", "evaluate_tasks", "harness_model_class"]


def _args(request) -> tuple:
    """The arguments of an lm-eval Instance (`.args`), or a plain tuple."""
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


def _check_count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"MemzooLM: {name} must be an int >= 1, got {value!r}")


class MemzooLM:
    """lm-eval's requests answered by a memzoo `LM` (see the module docstring).

    model: an LM (or a module with its forward -> logits and generate); tokenizer: its memzoo
    tokenizer.
    batch_size: sequences per forward pass; max_length: the most tokens the model is fed
    (contexts are cut from the left to fit), None for no limit.
    """

    def __init__(self, model: LM, tokenizer, *, batch_size: int = 8, max_length: int | None = None):
        _check_count("batch_size", batch_size)
        if max_length is not None:
            _check_count("max_length", max_length)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device=None, **options) -> MemzooLM:
        """Load a run (or checkpoint) directory; options as for the constructor."""
        model, tokenizer, _ = load_trained_lm(path, device=device)
        return cls(model, tokenizer, **options)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- scoring ---------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not continuation:
            raise ValueError("MemzooLM.loglikelihood: the continuation is empty")
        context_ids = self.tokenizer.encode(context)
        whole = self.tokenizer.encode(context + continuation)
        if whole[: len(context_ids)] != context_ids:  # a merge across the boundary
            return context_ids, self.tokenizer.encode(continuation)
        return context_ids, whole[len(context_ids) :]

    def _fit(self, ids: list[int], scored: int) -> list[int]:
        """Cut `ids` from the left so the model input (all but the last token) fits."""
        if self.max_length is None or len(ids) - 1 <= self.max_length:
            return ids
        if scored > self.max_length:
            raise ValueError(
                f"MemzooLM: a continuation of {scored} tokens does not fit max_length="
                f"{self.max_length}"
            )
        return ids[-(self.max_length + 1) :]

    @torch.no_grad()
    def _score(self, sequences: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For each (ids, n): the summed log-probability of the last n tokens of ids given the
        ones before, and whether each of them is the argmax. Equal lengths share a batch."""
        by_length: dict[int, list[int]] = {}
        for i, (ids, _) in enumerate(sequences):
            by_length.setdefault(len(ids), []).append(i)
        results: list[tuple[float, bool]] = [(0.0, True)] * len(sequences)
        for length, rows in sorted(by_length.items()):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                ids = torch.tensor([sequences[i][0] for i in chunk], device=self.device)
                logprobs = torch.log_softmax(self.model(ids[:, :-1]).float(), dim=-1)
                targets = ids[:, 1:]
                picked = logprobs.gather(-1, targets[..., None])[..., 0]
                greedy = logprobs.argmax(-1) == targets
                for row, i in enumerate(chunk):
                    n = sequences[i][1]
                    window = slice(length - 1 - n, length - 1)
                    results[i] = (float(picked[row, window].sum()), bool(greedy[row, window].all()))
        return results

    def loglikelihood(self, requests: Iterable) -> list[tuple[float, bool]]:
        """(log P(continuation | <eos> context), greedy?) per (context, continuation)."""
        sequences = []
        for request in requests:
            context, continuation = _args(request)[:2]
            context_ids, continuation_ids = self._encode_pair(context, continuation)
            ids = [self.tokenizer.eos_id, *context_ids, *continuation_ids]
            sequences.append((self._fit(ids, len(continuation_ids)), len(continuation_ids)))
        return self._score(sequences)

    def _rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], int]]:
        """(ids, n) pieces predicting every token of <eos> + tokens exactly once, each with
        as much context as max_length allows."""
        sequence = [self.tokenizer.eos_id, *tokens]
        if self.max_length is None:
            return [(sequence, len(tokens))]
        W, pieces = self.max_length, []
        for done in range(0, len(tokens), W):
            end = min(done + W, len(tokens))  # predict sequence[done + 1 : end + 1]
            pieces.append((sequence[max(0, end - W) : end + 1], end - done))
        return pieces

    def loglikelihood_rolling(self, requests: Iterable) -> list[float]:
        """log P(text | <eos>) per (text,), summed over rolling windows."""
        requests = list(requests)
        pieces, owner = [], []
        for index, request in enumerate(requests):
            windows = self._rolling_windows(self.tokenizer.encode(_args(request)[0]))
            pieces += windows
            owner += [index] * len(windows)
        totals = [0.0] * len(requests)  # an empty text has no tokens and log-probability 0
        for index, (logprob, _) in zip(owner, self._score(pieces), strict=True):
            totals[index] += logprob
        return totals

    # ---- generation ------------------------------------------------------------------------

    @staticmethod
    def _generation_options(options: dict) -> tuple[list[str], int]:
        options = dict(options or {})
        if options.get("do_sample") or float(options.get("temperature") or 0.0) > 0:
            raise ValueError(
                "MemzooLM.generate_until: only greedy decoding is supported; got do_sample="
                f"{options.get('do_sample')}, temperature={options.get('temperature')}"
            )
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = int(options.get("max_gen_toks", 256))
        _check_count("generate_until max_gen_toks", max_new_tokens)
        return until, max_new_tokens

    def _cut(self, tokens: list[int], until: list[str]) -> str:
        if self.tokenizer.eos_id in tokens:
            tokens = tokens[: tokens.index(self.tokenizer.eos_id)]
        text = self.tokenizer.decode(tokens)
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text

    @torch.no_grad()
    def generate_until(self, requests: Iterable) -> list[str]:
        """Greedy continuation of <eos> context per (context, generation options)."""
        jobs: dict[tuple[int, int], list[int]] = {}
        prompts, stops = [], []
        for index, request in enumerate(requests):
            context, options = _args(request)[:2]
            until, max_new_tokens = self._generation_options(options)
            ids = [self.tokenizer.eos_id, *self.tokenizer.encode(context)]
            if self.max_length is not None:
                ids = ids[-max(1, self.max_length - max_new_tokens) :]
            prompts.append(ids)
            stops.append(until)
            jobs.setdefault((len(ids), max_new_tokens), []).append(index)
        out = [""] * len(prompts)
        for (length, max_new_tokens), rows in jobs.items():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                ids = torch.tensor([prompts[i] for i in chunk], device=self.device)
                generated = self.model.generate(ids, max_new_tokens, greedy=True)[:, length:]
                for i, tokens in zip(chunk, generated.tolist(), strict=True):
                    out[i] = self._cut(tokens, stops[i])
        return out


# ---- lm-eval ------------------------------------------------------------------------------


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(
            "the lm-eval adapter needs lm-evaluation-harness: pip install 'memzoo[eval]' "
            "(or pip install lm-eval)"
        ) from error
    return lm_eval


@functools.cache
def harness_model_class():
    """The lm-eval model class for memzoo LMs, registered under the name "memzoo".

    From lm-eval's side: `--model memzoo --model_args checkpoint=RUN_DIR,batch_size=8` (and
    optionally max_length=N, device=cpu); from Python, `harness_model_class()(model=MemzooLM)`.
    """
    _import_lm_eval()
    from lm_eval.api.model import LM as HarnessLM
    from lm_eval.api.registry import register_model

    @register_model("memzoo")
    class MemzooHarnessLM(HarnessLM):
        """A MemzooLM behind lm-eval's model interface."""

        def __init__(
            self,
            checkpoint: str | None = None,
            batch_size: int | str | None = 8,
            device: str | None = None,
            max_length: int | str | None = None,
            model: MemzooLM | None = None,
        ):
            super().__init__()
            if model is None:
                if checkpoint is None:
                    raise ValueError("the memzoo lm-eval model needs checkpoint=RUN_DIR")
                if not str(batch_size or 8).isdigit():
                    raise ValueError(f"memzoo: batch_size must be an integer, got {batch_size!r}")
                model = MemzooLM.from_checkpoint(
                    checkpoint,
                    device=device,
                    batch_size=int(batch_size or 8),
                    max_length=None if max_length is None else int(max_length),
                )
            self.memzoo = model
            self._device = model.device

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.memzoo.loglikelihood(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.memzoo.loglikelihood_rolling(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.memzoo.generate_until(requests)

    return MemzooHarnessLM


def evaluate_tasks(
    model: MemzooLM,
    tasks: Sequence[str],
    *,
    data_dir: str | Path,
    seed: int = 0,
    num_examples: int = 50,
    passkey_lengths: Sequence[int] = (512,),
    num_kv_pairs: int = 8,
    limit: int | None = None,
) -> dict:
    """Run lm-eval `tasks` on `model`; returns lm-eval's results dict.

    The memzoo tasks (memzoo.eval.tasks; "memzoo" names all four) get their examples written
    into `data_dir` first (seed, num_examples, passkey_lengths, num_kv_pairs: see
    write_task_data) and need no network; other names are lm-eval's own tasks.
    """
    _import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from memzoo.eval.tasks import TASK_FILES, TASKS_DIR, write_task_data

    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"evaluate_tasks: tasks must be a non-empty list of names, got {tasks!r}")
    ours = set(TASK_FILES) | {"memzoo"}
    write_task_data(
        data_dir,
        seed=seed,
        num_examples=num_examples,
        passkey_lengths=passkey_lengths,
        num_kv_pairs=num_kv_pairs,
    )
    manager = TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=not set(tasks) <= ours,  # indexing lm-eval's own tasks takes seconds
        metadata={"data_dir": str(Path(data_dir).resolve())},
    )
    return simple_evaluate(
        model=harness_model_class()(model=model),
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        log_samples=False,
    )
