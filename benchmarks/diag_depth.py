"""Held-out hidden-state error of a SmolLM2 cut to the first B blocks, quantized at W3 g64.

python benchmarks/diag_depth.py NSAMPLES BLOCKS METHOD:PROPAGATE:DAMP ...
(e.g. 16 8 rtn:fp:0.01 gptq:fp:0.01 gptq:quantized:0.01)
"""
import copy, sys, torch
torch.set_num_threads(1)
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from lopro import QuantConfig, quantize
from lopro.data.assets import resolve_builtin_model
from lopro.data.windows import calibration_windows, eval_windows, tokenize_split
p = resolve_builtin_model("smollm2-135m")
tok = AutoTokenizer.from_pretrained(p)
model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
nb = int(sys.argv[2])
model.model.layers = nn.ModuleList(model.model.layers[:nb]); model.config.num_hidden_layers = nb
calib = calibration_windows(tokenize_split(tok, "wiki", "calib"), int(sys.argv[1]), 512, seed=0)
windows = eval_windows(tokenize_split(tok, "wiki", "eval"), 512, 4)
def herr(m):
    with torch.no_grad():
        a = m.model(windows).last_hidden_state; b = model.model(windows).last_hidden_state
    return ((a-b).norm()/b.norm()).item()
for spec in sys.argv[3:]:
    meth, prop, damp = spec.split(":")
    q, rep = quantize(copy.deepcopy(model), QuantConfig(method=meth, bits=3, group_size=64, propagate=prop, damp_percent=float(damp), true_sequential=False), calib, progress=False)
    print(spec, f"herr={herr(q):.4f}", flush=True)
