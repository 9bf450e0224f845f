"""Mixture-of-experts support: fused expert tensors, expert stages, starved experts, an upcycled test model.

transformers 5.x stores a block's routed experts as fused 3-D parameters (Mixtral:
`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`) inside a module whose forward takes
`(hidden_states, top_k_index, top_k_weights)` from the router. `unfuse_experts` swaps every such
module for an `UnfusedExperts` holding one `nn.Linear` per expert matrix (`experts.<e>.gate_proj`,
`.up_proj`, `.down_proj`) with the same forward, so the generic walk, hooks and methods see experts
as ordinary linears; each expert linear's hook sees exactly the tokens routed to that expert.
`refuse_experts` writes the (fake-quantized) weights back into the original module and layout.
Experts already stored as `nn.Linear` (`experts.<e>.*`) need no conversion.

Routers stay in full precision: they are not `nn.Linear` in 5.x (e.g. `MixtralTopKRouter`), and
linear ones are skipped by name (`walk.SKIP_LINEAR_NAMES`).

Options (`QuantConfig.options`):
- `min_expert_tokens_share` (default 0.1): an expert whose calibration token count is below this share
  of its fair share (sum of its siblings' tokens / number of experts) is quantized weight-only (see
  `weight_only_stats`), with a warning and `"fallback": true` in its report row. An expert with no
  token always falls back.
- `min_expert_tokens_per_input` (default 1.0): an expert matrix that saw fewer tokens than this many
  per input feature (tokens < 1.0 x in_features: a rank-deficient Hessian) also falls back. Decided
  per matrix: an expert's gate/up (H inputs) may keep their Hessian while its down_proj (I inputs)
  does not.
- `starved_expert_hessian` ("identity" by default, or "diagonal"): what a starved expert that did see
  some tokens is quantized with: H = I and mean |x| = 1 (weight-only), or its own H's diagonal and
  mean |x| (`diagonal_stats`). An expert with no token is always weight-only.
- `moe_weighted_hessian` (default False): weight each routed token's contribution to its expert's
  Hessian and mean |x| by its routing weight (H = 2 sum_t w_t x_t x_t^T / sum_t w_t). Applies to fused
  experts (the routing weights are visible only inside the experts module). Default: unweighted.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from lopro.methods.base import LayerStats
from lopro.model.walk import UnsupportedModelError

# Fused expert tensors: (up tensor, down tensor, gated). "gate_up_proj" holds gate and up stacked on
# the output dim (concatenated [gate; up], or interleaved when the module says is_concatenated=False).
FUSED_EXPERT_TENSORS = (("gate_up_proj", "down_proj", True), ("up_proj", "down_proj", False))
EXPERT_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?experts)\.(?P<index>\d+)\.(?P<suffix>.+)$")


@dataclass(frozen=True)
class FusedLayout:
    """How one fused-experts module stores its E experts (facts read from the module)."""

    up: str               # name of the [E, (2)I, H] tensor (gate_up_proj or up_proj)
    down: str             # name of the [E, H, I] tensor
    gated: bool
    num_experts: int
    hidden: int
    inter: int
    transposed: bool      # tensors stored [E, in, out] instead of [E, out, in]
    concatenated: bool    # gate/up as [gate; up] (True) or interleaved rows (False)
    bias: bool
    post_norm: bool


def fused_layout(mod: nn.Module) -> FusedLayout | None:
    """The layout of a fused-experts module, None if `mod` is not one; raises if it has expert
    tensors but an interface lopro cannot reproduce (never skip experts silently)."""
    params = mod._parameters
    for up, down, gated in FUSED_EXPERT_TENSORS:
        U, D = params.get(up), params.get(down)
        if U is None or D is None or U.dim() != 3 or D.dim() != 3:
            continue
        kind = f"{type(mod).__name__} ({up} {list(U.shape)}, {down} {list(D.shape)})"
        if not hasattr(mod, "is_transposed") and not _routed_signature(mod):
            raise UnsupportedModelError(f"{kind}: fused experts whose forward is not "
                                        "(hidden_states, top_k_index, top_k_weights); lopro cannot unfuse them")
        if getattr(mod, "_is_expert_parallel", False):
            raise UnsupportedModelError(f"{kind}: expert-parallel modules cannot be quantized; load the model whole")
        E = U.shape[0]
        transposed = getattr(mod, "is_transposed", None)
        if transposed is None:  # infer: [E, out, in] has down's out (H) equal to up's in
            transposed = U.shape[2] != D.shape[1]
        H, I2 = (U.shape[1], U.shape[2]) if transposed else (U.shape[2], U.shape[1])
        inter = I2 // 2 if gated else I2
        expect = (E, inter, H) if transposed else (E, H, inter)
        if D.shape[0] != E or tuple(D.shape) != expect or (gated and I2 % 2):
            raise UnsupportedModelError(f"{kind}: inconsistent expert tensor shapes")
        bias = bool(getattr(mod, "has_bias", params.get(f"{up}_bias") is not None))
        return FusedLayout(up, down, gated, E, H, inter, bool(transposed),
                           bool(getattr(mod, "is_concatenated", True)), bias,
                           bool(getattr(mod, "has_post_expert_norm", False)))
    return None


def _routed_signature(mod: nn.Module) -> bool:
    names = list(inspect.signature(mod.forward).parameters)
    return len(names) >= 3 and names[1:3] in (["top_k_index", "top_k_weights"], ["router_indices", "routing_weights"])


def find_fused_experts(module: nn.Module) -> dict[str, FusedLayout]:
    out = {}
    for name, mod in module.named_modules():
        layout = fused_layout(mod)
        if layout is not None:
            out[name] = layout
    return out


class ExpertMLP(nn.Module):
    """One expert's linears; `gate_proj` is None for ungated experts."""

    def __init__(self, gate_proj: nn.Linear | None, up_proj: nn.Linear, down_proj: nn.Linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return lin


class UnfusedExperts(nn.Module):
    """A fused-experts module as per-expert `nn.Linear`s (children "0".."E-1"), same forward.

    The original module (its expert tensors removed) is kept unregistered for `refuse()`; its child
    modules (activation, post-expert norm) are shared and registered here.
    """

    def __init__(self, fused: nn.Module, layout: FusedLayout):
        super().__init__()
        L = layout
        object.__setattr__(self, "_fused", fused)
        self.layout = L
        self.weighted_hessian = False
        names = list(inspect.signature(fused.forward).parameters)
        self._arg_names = tuple(names[1:3]) if len(names) >= 3 else ("top_k_index", "top_k_weights")
        U, D = fused._parameters[L.up], fused._parameters[L.down]
        Ub, Db = (fused._parameters.get(f"{L.up}_bias"), fused._parameters.get(f"{L.down}_bias")) if L.bias \
            else (None, None)
        tensors = (L.up, L.down, f"{L.up}_bias", f"{L.down}_bias")
        leftover = [n for n, p in fused._parameters.items() if p is not None and n not in tensors]
        if leftover or fused._buffers:
            raise UnsupportedModelError(f"{type(fused).__name__}: tensors {leftover + list(fused._buffers)} next "
                                        "to the fused experts; lopro does not know what they do")
        grad, rows = U.requires_grad, _gate_up_rows(L)
        for e in range(L.num_experts):  # views of the fused tensors (no copy)
            u = (U[e].T if L.transposed else U[e]).detach()  # [(2)I, H]
            d = (D[e].T if L.transposed else D[e]).detach()
            ub = Ub[e].detach() if Ub is not None else None
            gate = _linear(u[rows[0]], ub[rows[0]] if ub is not None else None, grad) if L.gated else None
            up = _linear(u[rows[1]], ub[rows[1]] if ub is not None else None, grad)
            down = _linear(d, Db[e].detach() if Db is not None else None, grad)
            self.add_module(str(e), ExpertMLP(gate, up, down))
        for name in tensors:
            if name in fused._parameters:
                fused.register_parameter(name, None)
        for name, child in fused.named_children():
            self.add_module(name, child)

    def expert(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    def forward(self, hidden_states, *args, **kwargs):
        top_k_index = args[0] if len(args) > 0 else kwargs[self._arg_names[0]]
        top_k_weights = args[1] if len(args) > 1 else kwargs[self._arg_names[1]]
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index[(top_k_index >= 0) & (top_k_index < self.layout.num_experts)])
        for e in hit.tolist():
            top_k_pos, token_idx = torch.where((top_k_index == e).T)  # same order as transformers' loop
            w = top_k_weights[token_idx, top_k_pos, None]
            y = self._expert_forward(e, hidden_states[token_idx], w)
            out.index_add_(0, token_idx, (y * w).to(out.dtype))
        return out

    def _expert_forward(self, e: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        mlp, L, fused = self.expert(e), self.layout, self._fused
        lins = [m for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj) if m is not None]
        if self.weighted_hessian:  # read by calibrate.StatsCollector's hooks
            for lin in lins:
                lin.calib_token_weights = w.reshape(-1)
        try:
            if L.gated:
                g, u = mlp.gate_proj(x), mlp.up_proj(x)
                gate_up = torch.cat([g, u], -1) if L.concatenated else torch.stack([g, u], -1).flatten(-2)
                h = fused._apply_gate(gate_up) if hasattr(fused, "_apply_gate") else fused.act_fn(g) * u
            else:
                h = fused.act_fn(mlp.up_proj(x))
            y = mlp.down_proj(h)
            return fused.post_expert_norm(y) if L.post_norm else y
        finally:
            for lin in lins:
                lin.__dict__.pop("calib_token_weights", None)

    def is_plain(self) -> bool:
        """True while every expert matrix is still an nn.Linear (not packed), so refusing is possible."""
        return all(type(m) is nn.Linear for m in self._linears())

    def _linears(self):
        for e in range(self.layout.num_experts):
            mlp = self.expert(e)
            yield from (m for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj) if m is not None)

    def refuse(self) -> nn.Module:
        """The original module with its fused tensors rebuilt from the current expert weights
        (written expert by expert into one new tensor each: one block's experts of extra memory)."""
        L, fused = self.layout, self._fused
        rows = _gate_up_rows(L)
        w0 = self.expert(0).down_proj.weight
        U = w0.new_empty(L.num_experts, (2 if L.gated else 1) * L.inter, L.hidden)
        D = w0.new_empty(L.num_experts, L.hidden, L.inter)
        Ub, Db = (w0.new_empty(U.shape[:2]), w0.new_empty(D.shape[:2])) if L.bias else (None, None)
        for e in range(L.num_experts):
            mlp = self.expert(e)
            for lin, r in ((mlp.gate_proj, rows[0]), (mlp.up_proj, rows[1])):
                if lin is not None:
                    U[e, r] = lin.weight.data
                    if L.bias:
                        Ub[e, r] = lin.bias.data
            D[e] = mlp.down_proj.weight.data
            if L.bias:
                Db[e] = mlp.down_proj.bias.data
        if L.transposed:
            U, D = U.transpose(1, 2).contiguous(), D.transpose(1, 2).contiguous()
        for name, t in ((L.up, U), (L.down, D), (f"{L.up}_bias", Ub), (f"{L.down}_bias", Db)):
            if t is not None:
                fused.register_parameter(name, nn.Parameter(t, requires_grad=w0.requires_grad))
        for name, child in self.named_children():  # children may have moved device with this module
            if not name.isdigit():
                setattr(fused, name, child)
        return fused


def _gate_up_rows(L: FusedLayout) -> tuple[slice | None, slice]:
    """Rows of the fused up tensor holding (gate, up): [gate; up], interleaved, or (None, all) ungated."""
    if not L.gated:
        return None, slice(None)
    if L.concatenated:
        return slice(0, L.inter), slice(L.inter, 2 * L.inter)
    return slice(0, None, 2), slice(1, None, 2)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def unfuse_experts(model: nn.Module, weighted_hessian: bool = False) -> list[str]:
    """Replace every fused-experts module of `model` by an `UnfusedExperts`, in place; returns their
    names. The per-expert weights are views of the fused tensors where the layout allows (no copy)."""
    done = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, UnfusedExperts):
            mod.weighted_hessian = weighted_hessian
            continue
        layout = fused_layout(mod)
        if layout is None:
            continue
        parent, attr = _parent(model, name)
        new = UnfusedExperts(mod, layout)
        new.weighted_hessian = weighted_hessian
        new.train(mod.training)
        setattr(parent, attr, new)
        done.append(name)
    return done


def refuse_experts(model: nn.Module) -> list[str]:
    """Put the original fused modules back wherever every expert matrix is still an nn.Linear
    (fake quantization); packed experts (QuantLinear) stay unfused. Returns the refused names."""
    done = [name for name, mod in model.named_modules() if isinstance(mod, UnfusedExperts) and mod.is_plain()]
    for name in done:  # by name, holding no module: each old storage is freed as soon as it is replaced
        parent, attr = _parent(model, name)
        setattr(parent, attr, getattr(parent, attr).refuse())
    return done


def expert_key(name: str) -> str | None:
    """'mlp.experts.3.gate_proj' -> 'mlp.experts.*.gate_proj'; None for a layer outside an experts list."""
    m = EXPERT_NAME.match(name)
    return f"{m['prefix']}.*.{m['suffix']}" if m else None


def expert_index(name: str) -> int | None:
    m = EXPERT_NAME.match(name)
    return int(m["index"]) if m else None


def expert_stages(groups: list[list[str]], names) -> list[list[str]]:
    """Calibration groups merged so that the same matrix of all experts forms one stage, completed with
    every layer of `names` that no group holds (experts that saw no token in the batches that set the
    groups). Experts of one stage read independent inputs, so in true-sequential mode they are
    calibrated and quantized together; the stage also gives each expert its siblings' token counts.
    Groups without experts are unchanged."""
    stages: list[list[str]] = []
    where: dict[str, int] = {}
    for group in groups:
        keys = {expert_key(n) for n in group} - {None}
        hit = next((where[k] for k in keys if k in where), None)
        if hit is None:
            hit = len(stages)
            stages.append([])
        stages[hit].extend(n for n in group if n not in stages[hit])
        where.update((k, hit) for k in keys)
    held = {n for s in stages for n in s}
    for n in names:
        if n in held:
            continue
        k = expert_key(n)
        if k is not None and k in where:
            stages[where[k]].append(n)
        else:
            stages.append([n])
            if k is not None:
                where[k] = len(stages) - 1
    for s in stages:  # experts in index order within a stage (they are independent)
        if any(expert_key(n) for n in s):
            s.sort(key=lambda n: (expert_index(n) if expert_index(n) is not None else -1, expert_key(n) or n))
    return stages


def starved_experts(names, stats: dict[str, LayerStats], min_share: float = 0.1,
                    min_per_input: float = 1.0) -> dict[str, str]:
    """Expert layers among `names` whose Hessian cannot be trusted; name -> reason, for the warning.

    Starved: no calibration token, fewer than `min_share` of the fair share (the siblings' total / their
    number), or fewer than `min_per_input` x in_features tokens. The last matters most: a Hessian from
    t < n tokens has rank <= t, so GPTQ's error feedback fits those tokens and pushes the error into
    directions the calibration never saw (upcycled SmolLM2, top-1 routing, W2: ppl 685k vs 2845 dense).
    """
    by_key: dict[str, list[str]] = {}
    for n in names:
        k = expert_key(n)
        if k is not None:
            by_key.setdefault(k, []).append(n)
    out = {}
    for siblings in by_key.values():
        tokens = {n: stats[n].tokens if stats.get(n) is not None else 0 for n in siblings}
        fair = sum(tokens.values()) / len(tokens)
        for n, t in tokens.items():
            H = getattr(stats.get(n), "H", None)
            width = H.shape[-1] if H is not None else 0
            if t == 0 or t < min_share * fair:
                out[n] = f"{t} calibration tokens, {t / fair if fair else 0:.1%} of its fair share {fair:.0f}"
            elif t < min_per_input * width:
                out[n] = (f"{t} calibration tokens for {width} inputs (under {min_per_input:g} per input: "
                          "a rank-deficient Hessian)")
    return out


def weight_only_stats(n: int, device=None) -> LayerStats:
    """Statistics that turn a method into its weight-only variant: H = I and mean |x| = 1.

    With H = I, GPTQ's error feedback vanishes (exactly RTN), low-rank methods get alpha = 1 (plain low
    rank of W) and rotations leave H unchanged; the result keeps the method's storage format."""
    return LayerStats(H=torch.eye(n, device=device), absmean=torch.ones(n, device=device), tokens=0)


def diagonal_stats(stats: LayerStats) -> LayerStats:
    """A starved expert's statistics reduced to what few tokens estimate well: the per-input second moments
    (H's diagonal) and mean |x|, without the correlations a rank-deficient H gets wrong."""
    return LayerStats(H=torch.diag(torch.diagonal(stats.H)), absmean=stats.absmean, tokens=stats.tokens)


def fallback_stats(width: int, stats: LayerStats | None, mode: str, device=None) -> tuple[LayerStats, str]:
    """What a starved layer is quantized with under option `starved_expert_hessian=mode`, and how to say it."""
    if mode == "diagonal" and stats is not None and stats.tokens > 0:
        return diagonal_stats(stats), "with its Hessian's diagonal only ({method}, no input correlations)"
    return weight_only_stats(width, device), "weight-only ({method} with H = I, no calibration statistics)"


def upcycle_smollm2(model: nn.Module, num_experts: int = 4, seed: int = 0, top_k: int = 2,
                    router_std: float = 0.02) -> nn.Module:
    """A Mixtral built from a Llama-architecture model (SmolLM2) by sparse upcycling: every expert is a
    copy of the block's MLP, the router is random N(0, router_std); attention, norms and (tied)
    embeddings are copied. Since the top-k routing weights sum to 1, it computes the dense model."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = model.config
    mlp0 = model.model.layers[0].mlp
    assert not getattr(c, "attention_bias", False) and not getattr(c, "mlp_bias", False), \
        "upcycling expects a Llama model without biases"
    cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None), hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None,
        initializer_range=c.initializer_range, attention_dropout=0.0)
    dtype = mlp0.gate_proj.weight.dtype
    with torch.device("meta"):
        moe = MixtralForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if ".mlp." not in k:
            sd[k] = v.detach().clone()
    for i, layer in enumerate(model.model.layers):
        m, p = layer.mlp, f"model.layers.{i}.mlp"
        gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach()
        sd[f"{p}.experts.gate_up_proj"] = gate_up[None].repeat(num_experts, 1, 1)
        sd[f"{p}.experts.down_proj"] = m.down_proj.weight.detach()[None].repeat(num_experts, 1, 1)
        sd[f"{p}.gate.weight"] = (torch.randn(num_experts, c.hidden_size, generator=gen) * router_std).to(dtype)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = moe.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    moe.model.rotary_emb = type(moe.model.rotary_emb)(cfg)  # non-persistent buffers were left on meta
    moe.tie_weights()
    moe.to(model.device)
    return moe.eval()
