"""Per-layer proxy loss of RTN, GPTQ and LoPRo on calibration and on held-out activations.

Uses the fp statistics cache written by bench_ppl.py (128 x 512 wiki calibration) and 4 held-out
wiki windows through the fp model:  python benchmarks/diag_heldout_loss.py BITS GROUP  (e.g. 4 -1)
"""
import torch, sys
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
from lopro.config import QuantConfig
from lopro.methods import get_method
from lopro.methods.base import LayerStats
from lopro.data.assets import resolve_builtin_model
from lopro.data.windows import eval_windows, tokenize_split
p = resolve_builtin_model("smollm2-135m")
m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(p)
win = eval_windows(tokenize_split(tok, "wiki", "eval"), 512, 4)
root = "/root/.cache/lopro/stats/smollm2-135m-instruct-fp32-b0f2dda186820064"
blocks = [0, 10, 20, 29]
names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
Hs = {}
def mk(key):
    def f(mod, a, o):
        x = a[0].reshape(-1, a[0].shape[-1]).double()
        Hs[key] = Hs.get(key, 0) + 2 * x.T @ x
    return f
for b in blocks:
    for n in names:
        m.model.layers[b].get_submodule(n).register_forward_hook(mk((b, n)))
with torch.no_grad(): m(win)
bits, g = int(sys.argv[1]), int(sys.argv[2])
for b in blocks:
    d = torch.load(f"{root}/block_{b:03d}.pt", weights_only=False)
    for n in names:
        st = LayerStats(**d["stats"][n])
        W = m.model.layers[b].get_submodule(n).weight.detach()
        He = (Hs[(b, n)] / (4 * 512)).float()
        res = []
        for meth in ["rtn", "gptq", "lopro"]:
            r = get_method(meth)(W, st, QuantConfig(method=meth, bits=bits, group_size=g))
            dW = (r.weight - W).double()
            res.append((torch.sum((dW @ st.H.double()) * dW).item(), torch.sum((dW @ He.double()) * dW).item()))
        print(b, f"{n:18s}", " | ".join(f"in {a:.4g} out {c:.4g}" for a, c in res), flush=True)
