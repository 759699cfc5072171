"""How much accelerator memory a training run will need, estimated before it starts (the Train tab shows it
next to the step count).

The parts that are plain sums are counted exactly: the model's weights as they sit on the device, the LoRA's
parameters, their gradients and the optimizer's state (the network is built on the meta device, so it costs
nothing). The activations autograd keeps for the backward pass are measured, not guessed: one training
forward of the host's own UNet runs on meta tensors (shapes only, no memory, no arithmetic) at the run's
batch size, resolution, token length and precision, and every tensor saved for backward is added up. With
gradient checkpointing, only each block's input is kept plus one block's activations at a time, so the
blocks' shares are measured separately.

Not counted: the CUDA context and the allocator's fragmentation (a few hundred MB on a real card), which
the report names as a margin."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

# optimizer state per trained parameter, in bytes (AdamW: two fp32 moments; 8-bit Adam: two bytes; Lion:
# one moment; Prodigy: four fp32 buffers; plain SGD none)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adamw_8bit": 2, "lion": 4, "prodigy": 16, "sgd": 0}
CONTEXT_MARGIN = 512 << 20      # CUDA context + allocator slack, named in the report, not measured


class _Call(nn.Module):
    """Lets torch.func.functional_call swap the host model's tensors while one of the host's own methods runs."""

    def __init__(self, host, fn):
        super().__init__()
        self.model = host.model
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _meta_state(model: nn.Module, dtype, trained_weights: set) -> tuple:
    """Meta copies of the model's parameters and buffers (floating ones in `dtype`); the weights LoRAs sit on
    require grad, so that autograd keeps what a LoRA's backward needs (the layer's input)."""
    state, params = {}, set()
    for name, p in model.named_parameters():
        m = torch.empty_like(p, device="meta", dtype=dtype if p.is_floating_point() else p.dtype)
        m.requires_grad_(id(p) in trained_weights)
        state["model." + name] = m
        params.add(id(m))
    for name, b in model.named_buffers():
        state["model." + name] = torch.empty_like(b, device="meta", dtype=dtype if b.is_floating_point() else b.dtype)
    return state, params


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def saved_activations(host, call, trained_weights: set, dtype, blocks=(), meta: bool = True,
                      not_activations: set = frozenset()) -> dict:
    """Bytes autograd keeps for backward while `call()` runs: 'total', and for each of `blocks` its 'inputs'
    and what it 'saved' (gradient checkpointing's arithmetic). With `meta`, on meta copies of the host
    model's tensors; else on the model itself, for code that cannot run on meta tensors (autograd keeps
    nothing: we hold what was saved until the count is done, so keep that call small). A tensor saved twice,
    or as views, counts once."""
    if meta:
        state, params = _meta_state(host.model, dtype, trained_weights)
    else:
        params = {id(p) for p in host.model.parameters()}
        for p in host.model.parameters():
            p.requires_grad_(id(p) in trained_weights)      # put back by the caller's HostSession
    params = params | set(not_activations)      # e.g. the network's own parameters: counted as such
    current, per_block, totals, seen = [], {}, {"total": 0, "largest_tensor": 0}, {}

    def pack(t):
        # memory is per storage: a tensor saved by several ops (a layer's input kept by its q, k and v
        # projections) or as views (linear keeps a reshaped input) counts once, as the tensor it views;
        # a weight, or a view of one (linear keeps W transposed), is no activation
        base = t._base if t._base is not None else t
        if id(base) not in params and id(base) not in seen:
            seen[id(base)] = base       # held while we count, so that ids stay unique
            totals["total"] += _nbytes(base)
            totals["largest_tensor"] = max(totals["largest_tensor"], _nbytes(base))
            if current:
                per_block[current[-1]]["saved"] += _nbytes(base)
        return t if meta else None

    def enter(i):
        def hook(module, args, kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            per_block[i] = {"inputs": sum(map(_nbytes, tensors)), "saved": 0}
            current.append(i)
        return hook

    def leave(*_):
        current.pop()

    handles = [b.register_forward_pre_hook(enter(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(leave) for b in blocks]
    # the model's own tensors, put back whatever happens: in the webui an exception inside functional_call
    # was seen to leave meta tensors in the text encoders (and then every later use of the model failed)
    held = [(m, dict(m._parameters), dict(m._buffers)) for m in host.model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if meta:
                torch.func.functional_call(_Call(host, call), state, (), strict=False)
            else:
                call()
    finally:
        for h in handles:
            h.remove()
        for m, params, buffers in held:
            m._parameters.update(params)
            m._buffers.update(buffers)
    return {**totals, "blocks": [per_block[i] for i in sorted(per_block)]}


def _kept(measured: dict, recomputed) -> int:
    """Activation memory at the peak of backward. Backward frees what it has used as it goes, so the peak is
    at its start: what lies outside the blocks, each block's activations or, for a block recomputed
    (`recomputed`: a bool per block, None without checkpointing), its input, the largest block recomputed,
    and the gradients in flight (an activation's and its input's: twice the largest saved tensor)."""
    blocks = measured["blocks"]
    recomputed = recomputed or [False] * len(blocks)
    again = [b for b, r in zip(blocks, recomputed) if r]
    kept = [b for b, r in zip(blocks, recomputed) if not r]
    outside = measured["total"] - sum(b["saved"] for b in blocks)
    return (outside + sum(b["saved"] for b in kept) + sum(b["inputs"] for b in again)
            + max((b["saved"] for b in again), default=0) + 2 * measured["largest_tensor"])


def recomputed_blocks(measured: dict, margin: float, rest: int) -> list:
    """Which blocks a checkpointing run recomputes (a bool per block). Each recomputed block costs a second
    forward of it; each kept one its activations. From all recomputed, blocks are kept, those with the least
    activations first, while the run's memory (`rest` + activations) stays within (1 + margin) times what
    recomputing every block needs: the memory asked for, and the recomputation that saves the least of it
    skipped. margin 0: every block recomputed (kohya's gradient checkpointing)."""
    blocks = measured["blocks"]
    plan = [True] * len(blocks)
    if margin <= 0:
        return plan
    budget = (rest + _kept(measured, plan)) * (1 + margin)
    for i in sorted(range(len(blocks)), key=lambda i: blocks[i]["saved"]):
        trial = plan[:i] + [False] + plan[i + 1:]
        if rest + _kept(measured, trial) <= budget:
            plan = trial
    return plan


class _AutocastOnMeta(torch.overrides.TorchFunctionMode):
    """Autocast's casts where there is no autocast (meta tensors): the floating inputs of the products autocast
    computes in its dtype (convolutions, linear layers, matrix products, attention) are cast to it before the
    op, above autograd, so that what autograd keeps has the dtype it has in the run (the rest follows torch's
    type promotion there as here). ldm's UNet casts its input to fp32, which autocast undoes op by op."""
    PRODUCTS = {F.linear, F.conv2d, torch.conv2d, F.scaled_dot_product_attention, torch.matmul, torch.bmm,
                torch.baddbmm, torch.mm, torch.addmm, torch.einsum, torch.Tensor.__matmul__, torch.Tensor.matmul}

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.PRODUCTS:
            cast = lambda t: (t.to(self.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()  # noqa: E731
                              and t.dtype != self.dtype else t)
            args, kwargs = torch.utils._pytree.tree_map(cast, (args, kwargs))
        return func(*args, **kwargs)


def _context_width(host) -> int:
    """The cross-attention context width: the input width of the first cross-attention key projection."""
    for name, m in host.unet.named_modules():
        if name.endswith("attn2.to_k") and isinstance(m, nn.Linear):
            return m.in_features
    raise ValueError("no cross-attention layer found in the UNet")


def _held_in(host, amp, device) -> int:
    """Bytes the run adds (or, on a GPU, saves) by holding the frozen Linear / Conv weights in the autocast
    dtype (train.session): the cast copies; on a GPU the originals wait in CPU memory."""
    from .session import frozen_roots, held_parameters

    size = torch.empty((), dtype=amp).element_size() if amp is not None else 0
    return sum(p.numel() * size - (0 if device.type == "cpu" else _nbytes(p))
               for p in held_parameters(frozen_roots(host), amp) if p.device == device)


def _model_bytes(host, cfg, train_te: bool, amp, device) -> tuple:
    """(the model's bytes on the device through the steps, the text encoders' until every caption is encoded,
    the VAE decoder's freed at once): what leaves before the first step (train.leaving) counts not."""
    from .leaving import decoder_parts, encoders_leave

    encoders = ({id(p) for m in host.text_encoders() for p in m.parameters()}
                if encoders_leave(host, cfg, train_te, device) else set())
    decoder = {id(p) for m in decoder_parts(host, cfg) for p in m.parameters()}
    size = {"steps": 0, "encoders": 0, "decoder": 0}
    for p in host.model.parameters():
        if p.device == device:
            size["decoder" if id(p) in decoder else "encoders" if id(p) in encoders else "steps"] += _nbytes(p)
    return size["steps"] + _held_in(host, amp, device), size["encoders"], size["decoder"]


def estimate(host, cfg) -> dict:
    """Estimated peak memory of a training run on the device the host's UNet is on, in bytes, by part."""
    from .network import network_for
    from .network_args import spec
    from .optim import autocast_dtype
    from .session import HostSession, frozen_roots
    from .dataset_config import widest
    from .upcast import upcast_patches

    cfg = widest(cfg)       # a dataset TOML's largest resolution and batch
    device = next(host.unet.parameters()).device
    amp = autocast_dtype(cfg.mixed_precision, device, [])
    wanted = spec(cfg)
    unet_lr, te_lr = wanted.lrs["unet"], wanted.lrs["te"]
    with torch.device("meta"):
        network = network_for(host, wanted)
    lora_params = sum(p.numel() for p in network.parameters())
    state_bytes = OPTIMIZER_STATE_BYTES.get(cfg.optimizer_type.lower(), 8)
    weights, leaving, decoder = _model_bytes(host, cfg, bool(network.te_parameters()), amp, device)
    # the meta model's weights in one dtype: without autocast the model's own (on a CPU fp32, whatever the
    # frozen weights are stored in: train.upcast); under autocast its dtype (the frozen weights are held in
    # it), with autocast's casts of the products' inputs made by _AutocastOnMeta
    if amp is None:
        dtype = torch.float32 if device.type == "cpu" else next(host.unet.parameters()).dtype
    else:
        dtype = amp
    # attention counted as a fused kernel keeps it (what the run uses on a GPU: SDPA or xformers); frozen
    # weights stored narrow cast up as in the run (the text encoders' count runs them for real)
    upcast = upcast_patches(frozen_roots(host)) if amp is None and device.type == "cpu" else []
    with HostSession(host.model, (), host.estimate_attention_patches() + upcast):
        unet = _unet_saved(host, cfg, network, dtype, amp, unet_lr > 0)
        activations = _text_encoder_saved(host, cfg, network, dtype, amp, device) if te_lr > 0 else 0
    parts = {"weights": weights, "lora": lora_params * 4, "gradients": lora_params * 4,
             "optimizer": lora_params * state_bytes}
    blocks = host.checkpoint_blocks()
    # frozen weights stored narrow and cast up at use plan as the same run on fp32 copies: that storage is
    # asked to save memory, not to buy recomputation with it (a smaller run would leave a smaller margin)
    rest = sum(parts.values()) + activations + _widened(upcast)
    recomputed = (recomputed_blocks(unet, cfg.checkpointing_margin, rest)
                  if cfg.gradient_checkpointing and len(unet["blocks"]) == len(blocks) else None)
    parts["activations"] = activations + _kept(unet, recomputed)
    margin = CONTEXT_MARGIN if device.type == "cuda" else 0
    # until every caption is encoded the leaving encoders are there too, without the weights read only after
    # they leave (a headless run's UNet): the peak may be that moment's
    later = host.pending.nbytes if host.pending is not None else 0
    return {"device": str(device), "parts": parts, "margin": margin, "encoders_until_cached": leaving,
            "decoder_freed": decoder, "read_after_encoders": later,
            "total": max(sum(parts.values()), weights - later + leaving) + margin,
            "lora_parameters": lora_params, "dtype": str(dtype).removeprefix("torch."),
            "recomputed": recomputed, "all_recomputed": _kept(unet, [True] * len(unet["blocks"]))}


def _widened(upcast: list) -> int:
    """Bytes the layers of train.upcast's patches (weights stored narrow, cast up at use) would add as fp32
    copies."""
    return sum(p.numel() * 4 - _nbytes(p) for layer, _ in upcast for p in layer.parameters(recurse=False)
               if p.is_floating_point() and p.dtype != torch.float32)


def _unet_saved(host, cfg, network, dtype, amp, trained: bool) -> dict:
    """saved_activations of one training forward of the UNet on meta tensors, at the run's batch size,
    resolution and token length, per checkpoint block; the meta network on the UNet's layers, so that what
    its modules keep (a weight-form type's whole changed weight) is counted where it is kept: inside a
    checkpointed block only while that block is recomputed. `trained`: the UNet's LoRAs learn (their layers
    keep their inputs)."""
    w, h = cfg.size
    batch, tokens = cfg.train_batch_size, 77 * (cfg.max_token_length // 75)
    weights = {id(b.param) for b in host.lora_targets().values() if b.target.is_unet} if trained else set()
    channels = getattr(host.unet, "in_channels", 4)

    def unet_forward():
        noisy = torch.empty(batch, channels, h // 8, w // 8, device="meta", dtype=dtype)
        with _AutocastOnMeta(amp) if amp is not None else contextlib.nullcontext():
            return host.predict(noisy, torch.zeros(batch, dtype=torch.long, device="meta"),
                                _meta_cond(host, batch, tokens, dtype))

    network.attach(lambda bound: bound.target.is_unet)
    try:
        return saved_activations(host, unet_forward, weights, dtype, host.checkpoint_blocks(),
                                 not_activations={id(p) for p in network.parameters()})
    finally:
        network.detach()


def _text_encoder_saved(host, cfg, network, dtype, amp, device) -> int:
    """Bytes the trained text encoders keep for backward over a batch: transformers' CLIP cannot run on meta
    tensors, so one real caption, its saved tensors dropped at once; and their weight-form modules' changed
    weights."""
    weights = {id(b.param) for b in host.lora_targets().values() if not b.target.is_unet}
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        te = saved_activations(host, lambda: host.encode_text(["a"], cfg.clip_skip, cfg.max_token_length).tokens,
                               weights, dtype, meta=False)
    return te["total"] * cfg.train_batch_size + formed_weights(network, lambda b: not b.target.is_unet)


def formed_weights(network, only) -> int:
    """Bytes the weight-form modules of the layers `only(bound)` picks (LoHa, LoKr, DoRA: each step they build
    their layer's whole changed weight) hold for the backward pass, measured by building each on the meta
    device (the text encoders', whose activations are measured on the real model without the network)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for name, m in network.loras.items():
            if m.forms_weight and only(network.bound[name]):
                d = m.weight_delta(torch.empty(m.geo.shape, device="meta"))
                total += d.numel() * d.element_size()      # the change itself, which the layer's op keeps
    return total


def _meta_cond(host, batch: int, tokens: int, dtype):
    from ..hosts.conditioning import Cond

    cross = torch.empty(batch, tokens, _context_width(host), device="meta", dtype=dtype)
    if getattr(host, "pooled_width", None) is None:
        return Cond(cross)
    return Cond(cross, torch.empty(batch, host.pooled_width, device="meta", dtype=dtype),
                torch.empty(batch, 6, device="meta"))


def describe(est: dict) -> str:
    """One line for the Train tab."""
    gib = lambda n: f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"  # noqa: E731
    parts = ", ".join(f"{k} {gib(v)}" for k, v in est["parts"].items())
    margin = f" + {gib(est['margin'])} CUDA context" if est["margin"] else ""
    leaving = (f"; the text encoders' {gib(est['encoders_until_cached'])} until every caption is encoded, "
               "then they leave" if est.get("encoders_until_cached") else "")
    decoder = f"; the VAE decoder's {gib(est['decoder_freed'])} freed" if est.get("decoder_freed") else ""
    later = (f"; the UNet's {gib(est['read_after_encoders'])} read once the text encoders are freed"
             if est.get("read_after_encoders") else "")
    return (f"about **{gib(est['total'])}** on {est['device']} ({parts}{margin}; activations in {est['dtype']}"
            f"{leaving}{later}{decoder})")


def summary(host, cfg, lock=None) -> str:
    """describe(estimate(...)), or why there is none. `lock` (a context manager) keeps the host's model to
    us while the estimate borrows it (in the webui: its generation lock)."""
    return estimated(host, cfg, lock)[1]


def estimated(host, cfg, lock=None) -> tuple:
    """(estimate or None, summary's line)."""
    try:
        with lock or contextlib.nullcontext():
            est = estimate(host, cfg)
        return est, describe(est)
    except Exception as e:      # advisory only: a host the estimate cannot run on must not block training
        return None, f"not available ({type(e).__name__}: {e})"
