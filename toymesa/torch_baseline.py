"""PyTorch eager baseline: one training step for a population of N independent models.

The benchmark compares toymesa's JAX population training (`toymesa.train`, vmap over
members under jit) with the strongest honest *eager* PyTorch equivalent at equal work.
Every member's parameters carry a leading member axis N and the forward pass uses
batched matmuls over that axis, so one eager step trains all N members at once.

Computed (the same model and loss as `toymesa.model` / `toymesa.train`):

* tokens int64[N, B, T], loss mask bool[N, B, T]; d = d_model, H heads of size dh, M = d_mlp.
* x = embed[tokens] + pos_embed[:T]                                    [N, B*T, d]
* per block (pre-LN): x += out(attn(ln1(x))); x += down(gelu_tanh(up(ln2(x))))
  attention: fused qkv projection [N, d, 3d] (+ bias), softmax(q k^T / sqrt(dh)) with a
  causal mask, written out with batched matmuls (as the JAX model does by hand).
  LayerNorm eps=1e-6 with scale and bias (flax ``nnx.LayerNorm``); gelu is the tanh
  approximation (``jax.nn.gelu``'s default). ``layer_norm=False`` drops every LayerNorm,
  ``attn_only=True`` drops ln2 and the MLP.
* logits = unembed(ln_final(x))                                        [N, B, T, V]
* per-member loss: cross-entropy of logits[:, :, :-1] against tokens[:, :, 1:], masked by
  m = mask[:, :, 1:]: loss_i = sum(ce * m) / max(sum(m), 1)             [N]
* backward of sum_i loss_i (members are independent, so each gets its own gradient),
  then per-member global-norm clipping (the norm over all of that member's parameters, as
  ``optax.clip_by_global_norm`` inside the vmapped JAX step), then AdamW (eps 1e-8,
  decoupled weight decay only on the matrices and embeddings, i.e. parameters with
  ndim >= 2 not counting the member axis, as `toymesa.train._decay_mask`).

Differences from the JAX step, all irrelevant to the cost of a step:

* the learning rate is a constant scalar (JAX: warmup + cosine schedule of ``hparams.lr``,
  a few scalar flops per step) and lr / weight decay are shared by all members (JAX: per
  member arrays); set them with the constructor;
* `time_steps` draws uniform random tokens outside the timed region (JAX samples task
  sequences inside its scanned step);
* fresh parameters use flax's initialiser *distributions* but torch's random numbers; use
  `TorchPopulation.load_from_jax` for identical parameters.

Storage: one leaf tensor per parameter, ``params[name]`` in JAX layout with the member
axis in front (e.g. ``blocks.0.attn.qkv.kernel`` [N, d, 3d]; kernels are [in, out], so a
linear layer is ``baddbmm(bias, x, kernel)``). ``flat=True`` instead keeps all parameters
in two flat leaves, [N, P_decay] and [N, P_no_decay], with the named parameters as views
(fewer, larger clipping and AdamW ops); it measured no faster on CPU.

Formulations measured on CPU (2 threads): matmul "bmm" (baddbmm with the bias fused) vs
"einsum"; AdamW "fused" vs "foreach"; attention "manual" vs "sdpa"; flat vs per-parameter
storage. The defaults are the fastest or tied; the others remain as options.

Import this module only where torch is installed; nothing else in toymesa imports it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from toymesa.config import Config

MATMULS = ("bmm", "einsum")
OPTIMIZERS = ("foreach", "fused")
ATTENTIONS = ("manual", "sdpa")


def param_specs(cfg: Config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, per-member shape) of every parameter, named as the flattened JAX state."""
    from toymesa.tasks import vocab

    m = cfg.model
    d, V, T = m.d_model, vocab(cfg.task).size, cfg.task.seq_len

    def linear(name, n_in, n_out):
        return [(f"{name}.kernel", (n_in, n_out)), (f"{name}.bias", (n_out,))]

    def norm(name):
        return [(f"{name}.scale", (d,)), (f"{name}.bias", (d,))] if m.layer_norm else []

    specs = [("embed.embedding", (V, d)), ("pos_embed.embedding", (T, d))]
    for i in range(m.n_layers):
        b = f"blocks.{i}"
        specs += norm(f"{b}.ln1") + linear(f"{b}.attn.qkv", d, 3 * d) + linear(f"{b}.attn.out", d, d)
        if not m.attn_only:
            specs += norm(f"{b}.ln2") + linear(f"{b}.mlp.up", d, m.d_mlp) + linear(f"{b}.mlp.down", m.d_mlp, d)
    return specs + norm("ln_final") + linear("unembed", d, V)


def flatten_names(tree, prefix=""):
    """Nested dict (``nnx.to_pure_dict``) -> {dotted name: array}."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_names(v, name + "."))
        else:
            out[name] = v
    return out


def loss_mask(cfg: Config, n_members: int, batch_size: int) -> torch.Tensor:
    """The task's real training loss mask (the same for every row), bool[N, B, T]."""
    from toymesa.tasks import layout

    lay = layout(cfg.task)
    pos = torch.arange(cfg.task.seq_len)
    return ((pos >= lay.prompt_len) & (pos < lay.length)).expand(n_members, batch_size, -1).contiguous()


class TorchPopulation:
    """N independent toymesa transformers trained together in eager PyTorch.

    ``TorchPopulation(cfg, n_members, seed)``; ``lr`` / ``weight_decay`` default to
    ``cfg.hparams`` and stay constant. Options (defaults are the fastest measured on CPU):
    ``matmul`` "bmm" (baddbmm with the bias fused) or "einsum"; ``optimizer`` "foreach" or
    "fused" (torch.optim.AdamW implementations); ``attention`` "manual" (batched matmuls +
    softmax, as the JAX model) or "sdpa" (``F.scaled_dot_product_attention``, same math);
    ``flat`` two flat leaf tensors (True) or one leaf per parameter (False).
    """

    def __init__(
        self,
        cfg: Config,
        n_members: int,
        seed: int = 0,
        *,
        lr: float | None = None,
        weight_decay: float | None = None,
        matmul: str = "bmm",
        optimizer: str = "fused",
        attention: str = "manual",
        flat: bool = False,
    ):
        for name, value, choices in (("matmul", matmul, MATMULS), ("optimizer", optimizer, OPTIMIZERS), ("attention", attention, ATTENTIONS)):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is invalid: choose one of {choices}")
        if n_members < 1:
            raise ValueError(f"n_members={n_members!r} is invalid: use an integer >= 1")
        self.cfg, self.n = cfg, n_members
        self.lr = float(cfg.hparams.lr if lr is None else lr)
        self.weight_decay = float(cfg.hparams.weight_decay if weight_decay is None else weight_decay)
        self.matmul, self.optimizer_kind, self.attention, self.flat = matmul, optimizer, attention, flat
        self.specs = param_specs(cfg)
        self.shapes = dict(self.specs)
        self.decay = {name: len(shape) >= 2 for name, shape in self.specs}
        self._build_storage()
        self._init_params(seed)
        self.reset_optimizer()
        T = cfg.task.seq_len
        self._causal_bias = torch.full((T, T), -math.inf).triu(1)  # 0 on and below the diagonal

    # ------------------------------------------------------------------ parameters
    def _build_storage(self):
        N = self.n
        if self.flat:  # {decay: (leaf [N, P], names, sizes)}; params are views, rebuilt by _views()
            self.groups = {}
            for decay in (True, False):
                names = [name for name, _ in self.specs if self.decay[name] == decay]
                sizes = [math.prod(self.shapes[name]) for name in names]
                self.groups[decay] = (torch.zeros(N, sum(sizes), requires_grad=True), names, sizes)
            with torch.no_grad():
                self.params = self._views()
        else:  # {decay: [leaf [N, *shape], ...]}
            self.params = {name: torch.zeros((N, *shape), requires_grad=True) for name, shape in self.specs}
            self.groups = {decay: [self.params[n] for n, _ in self.specs if self.decay[n] == decay] for decay in (True, False)}

    def _views(self) -> dict[str, torch.Tensor]:
        """Named [N, *shape] views of the flat leaves (recomputed each forward for autograd)."""
        if not self.flat:
            return self.params
        out = {}
        for leaf, names, sizes in self.groups.values():
            for name, part in zip(names, leaf.split(sizes, dim=1), strict=True):
                out[name] = part.view(self.n, *self.shapes[name])
        return out

    def leaves(self) -> dict[bool, list[torch.Tensor]]:
        """The leaf tensors by decay flag (what the optimizer updates)."""
        if self.flat:
            return {decay: [g[0]] for decay, g in self.groups.items()}
        return self.groups

    @torch.no_grad()
    def _init_params(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        params = self._views()
        for name, shape in self.specs:
            p = params[name]
            if name.endswith(".embedding"):
                p.normal_(0.0, 1.0 / math.sqrt(shape[1]), generator=gen)  # flax default_embed_init
            elif name.endswith(".kernel"):
                std = 1.0 / math.sqrt(shape[0]) / 0.87962566103423978  # lecun_normal: truncated normal, variance 1/fan_in
                torch.nn.init.trunc_normal_(p, 0.0, std, -2 * std, 2 * std, generator=gen)
            elif name.endswith(".scale"):
                p.fill_(1.0)
            else:
                p.zero_()

    def reset_optimizer(self):
        """A fresh AdamW (step count and moments zero)."""
        leaves = self.leaves()
        groups = [{"params": leaves[True], "weight_decay": self.weight_decay}, {"params": leaves[False], "weight_decay": 0.0}]
        tc = self.cfg.train
        kind = {"foreach": True} if self.optimizer_kind == "foreach" else {"fused": True}
        self.opt = torch.optim.AdamW(groups, lr=self.lr, betas=(tc.b1, tc.b2), eps=1e-8, **kind)

    @torch.no_grad()
    def load_from_jax(self, params):
        """Copy a JAX population's parameters (nnx.State or pure dict, leading axis N) in; resets the optimizer."""
        from flax import nnx

        tree = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
        flat = flatten_names(tree)
        if set(flat) != set(self.shapes):
            raise ValueError(f"parameter names differ: missing {sorted(set(self.shapes) - set(flat))}, unexpected {sorted(set(flat) - set(self.shapes))}")
        views = self._views()
        for name, value in flat.items():
            a = np.asarray(value)
            if a.shape != (self.n, *self.shapes[name]):
                raise ValueError(f"{name} has shape {a.shape}; expected {(self.n, *self.shapes[name])}")
            views[name].copy_(torch.from_numpy(np.array(a, copy=True)))
        self.reset_optimizer()

    def to_numpy(self) -> dict[str, np.ndarray]:
        """{name: float32[N, *shape]} in JAX layout (kernels [in, out])."""
        return {name: v.detach().numpy().copy() for name, v in self._views().items()}

    # ------------------------------------------------------------------ forward
    def _linear(self, p, name, x):
        """x [N, R, in] @ kernel [N, in, out] + bias [N, out]."""
        w, b = p[f"{name}.kernel"], p[f"{name}.bias"]
        if self.matmul == "bmm":
            return torch.baddbmm(b.unsqueeze(1), x, w)
        return torch.einsum("nri,nio->nro", x, w) + b.unsqueeze(1)

    def _norm(self, p, name, x):
        if not self.cfg.model.layer_norm:
            return x
        xhat = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
        return torch.addcmul(p[f"{name}.bias"].unsqueeze(1), xhat, p[f"{name}.scale"].unsqueeze(1))

    def _attention(self, p, name, x, B, T):
        m = self.cfg.model
        N, H, dh = self.n, m.n_heads, m.d_head
        qkv = self._linear(p, f"{name}.qkv", x).view(N, B, T, 3, H, dh)
        if self.attention == "sdpa":
            q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, N * B, H, T, dh).unbind(0)
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [N*B, H, T, dh]
        else:
            q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, N * B * H, T, dh).unbind(0)
            scores = torch.baddbmm(self._causal_bias, q, k.transpose(1, 2), alpha=1.0 / math.sqrt(dh))
            z = torch.bmm(torch.softmax(scores, dim=-1), v)
        z = z.view(N, B, H, T, dh).transpose(2, 3).reshape(N, B * T, H * dh)
        return self._linear(p, f"{name}.out", z)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """float[N, B, T, V] for int64 tokens [N, B, T]."""
        N, B, T = tokens.shape
        m = self.cfg.model
        p = self._views()
        emb = p["embed.embedding"]
        idx = tokens.reshape(N, B * T, 1).expand(N, B * T, emb.shape[-1])
        x = torch.gather(emb, 1, idx).view(N, B, T, -1) + p["pos_embed.embedding"][:, :T].unsqueeze(1)
        x = x.reshape(N, B * T, -1)
        for i in range(m.n_layers):
            b = f"blocks.{i}"
            x = x + self._attention(p, f"{b}.attn", self._norm(p, f"{b}.ln1", x), B, T)
            if not m.attn_only:
                h = F.gelu(self._linear(p, f"{b}.mlp.up", self._norm(p, f"{b}.ln2", x)), approximate="tanh")
                x = x + self._linear(p, f"{b}.mlp.down", h)
        return self._linear(p, "unembed", self._norm(p, "ln_final", x)).view(N, B, T, -1)

    def losses(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-member masked mean cross-entropy float[N] (differentiable)."""
        logits = self.logits(tokens)
        V = logits.shape[-1]
        ce = F.cross_entropy(logits[:, :, :-1].reshape(-1, V), tokens[:, :, 1:].reshape(-1), reduction="none").view(tokens.shape[0], -1)
        m = mask[:, :, 1:].reshape(tokens.shape[0], -1).to(ce.dtype)
        return (ce * m).sum(1) / m.sum(1).clamp(min=1.0)

    # ------------------------------------------------------------------ public API
    @staticmethod
    def _as_tensors(tokens, mask):
        t = tokens if isinstance(tokens, torch.Tensor) else torch.from_numpy(np.array(tokens, dtype=np.int64))
        m = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.array(mask, dtype=bool))
        return t.long(), m.bool()

    @torch.no_grad()
    def loss(self, tokens, mask) -> np.ndarray:
        """Per-member masked loss float32[N] of tokens int[N, B, T] with loss mask bool[N, B, T]."""
        return self.losses(*self._as_tensors(tokens, mask)).numpy()

    def grads(self, tokens, mask) -> dict[str, np.ndarray]:
        """Unclipped gradients {name: [N, *shape]} of the per-member losses (zeroes .grad afterwards)."""
        self.opt.zero_grad(set_to_none=True)
        self.losses(*self._as_tensors(tokens, mask)).sum().backward()
        if self.flat:
            out = {}
            for leaf, names, sizes in self.groups.values():
                for name, g in zip(names, leaf.grad.split(sizes, dim=1), strict=True):
                    out[name] = g.reshape(self.n, *self.shapes[name]).numpy().copy()
        else:
            out = {name: v.grad.numpy().copy() for name, v in self.params.items()}
        self.opt.zero_grad(set_to_none=True)
        return out

    def step(self, tokens, mask) -> torch.Tensor:
        """One training step of every member; returns the per-member losses float[N] before it.

        Gradient of sum_i loss_i, per-member global-norm clipping to ``cfg.train.grad_clip``,
        then AdamW at the constant lr. Returns a detached tensor (no host copy in the loop).
        """
        tokens, mask = self._as_tensors(tokens, mask)
        self.opt.zero_grad(set_to_none=True)
        losses = self.losses(tokens, mask)
        losses.sum().backward()
        self._clip()
        self.opt.step()
        return losses.detach()

    @torch.no_grad()
    def _clip(self):
        """Scale member i's gradients by clip / max(norm_i, clip), norm_i over all its parameters."""
        grads = [p.grad for ps in self.leaves().values() for p in ps if p.grad is not None]
        sq = sum(g.reshape(self.n, -1).square().sum(1) for g in grads)
        clip = self.cfg.train.grad_clip
        factor = clip / sq.sqrt().clamp(min=clip)  # exactly 1 where the norm is below the threshold
        for g in grads:
            g.mul_(factor.view(self.n, *([1] * (g.dim() - 1))))


def time_steps(cfg: Config, n_members: int, n_steps: int, threads: int | None = None, *, batch_size: int | None = None, seed: int = 0, **options) -> float:
    """Seconds per eager training step of a population of `n_members` (after 2 warmup steps).

    Tokens are uniform random ids of the task's vocabulary, int64[N, B, T] with
    B = `batch_size` (default ``cfg.train.batch_size``) and T = ``cfg.task.seq_len``; the
    loss mask is the task's real one (the answer span after the prompt; the cost does not
    depend on it). A few batches are made before timing and cycled, so data generation is
    not timed. `threads` sets ``torch.set_num_threads`` for the call. `options` go to
    `TorchPopulation` (matmul, optimizer, attention, flat).
    """
    from toymesa.tasks import vocab

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        pop = TorchPopulation(cfg, n_members, seed, **options)
        B = cfg.train.batch_size if batch_size is None else batch_size
        gen = torch.Generator().manual_seed(seed + 1)
        batches = [torch.randint(0, vocab(cfg.task).size, (n_members, B, cfg.task.seq_len), generator=gen) for _ in range(4)]
        mask = loss_mask(cfg, n_members, B)
        for i in range(2):
            pop.step(batches[i % len(batches)], mask)
        start = time.perf_counter()
        for i in range(n_steps):
            losses = pop.step(batches[i % len(batches)], mask)
        float(losses.sum())  # eager CPU is synchronous; keep the result alive
        return (time.perf_counter() - start) / n_steps
    finally:
        torch.set_num_threads(old_threads)
