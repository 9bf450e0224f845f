"""llm-compressor's GPTQ on a saved fp model and a saved calibration tensor; run by bench_speed.py with the
Python of a separate venv that has `llmcompressor` (it is not a dependency of lopro).

    python _llmc_gptq.py MODEL_DIR CALIB.pt BITS GROUP_SIZE BATCH_SIZE THREADS

Prints one JSON line: {"quant_s": seconds inside oneshot(), ...}.
"""
import json
import sys
import time

import torch


def main() -> None:
    model_dir, calib_path, bits, group, batch, threads = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    calib = torch.load(calib_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    weights = QuantizationArgs(num_bits=int(bits), type="int", symmetric=False, strategy="group",
                               group_size=int(group))  # lopro's default grid: asymmetric, per group
    recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=0.01, block_size=128, actorder=None)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], batch_size=int(batch), pipeline="sequential",
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    import llmcompressor

    print(json.dumps({"quant_s": seconds, "version": llmcompressor.__version__, "batch_size": int(batch)}))


if __name__ == "__main__":
    main()
