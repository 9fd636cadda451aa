"""Attribution patching (AtP) at every site in one backward pass; edge attribution (EAP, EAP-IG).

**AtP** (Nanda 2023; Kramár et al. 2024) is the first-order estimate of activation patching:

    AtP(a) = (a_source - a_base) . dm/da |_(base run)

elementwise at every site from one `core.site_grad` call, then summed to a grid (`grid`).
Directions and base/source as in `patching`: denoise (base corrupt, source clean) and noise.
AtP is exact when m is affine in the site: in an attention-only, LayerNorm-free model with a
logit-difference metric, m is affine in every head output of the *last* layer, so in a
one-layer model AtP at ``hook_z`` equals patching, for one cell or any set of cells. In 2+
layers a layer-0 head also feeds later softmaxes (queries and keys), so it is not exact there.
One left-Riemann step of IG at a site (`ig.ig_site(steps=1, rule="riemann_left")`) is AtP.

**EAP** (Syed et al. 2023) splits AtP over edges u -> v of the residual graph:

    EAP(u -> v) = Delta out_u . dm/d in_v      (per example, per position t)

(a sender writes at position t of the residual stream and a receiver reads the same position,
so each edge is resolved per position; `edges` computes it from one `atp` result.)
Senders u (`senders`): the embeddings (token + position), each head (its share of attn_out,
z_h W_O,h), each MLP's output. Receivers v (`receivers`): each layer's attention input (the
heads of one layer share one input: receivers at layer granularity), each MLP's input, the
unembedding. dm/d in_v is the derivative through v alone. The model has one residual stream,
not a copy per receiver, but resid_mid = resid_pre + attn(resid_pre) and resid_post =
resid_mid + mlp(resid_mid), so by the chain rule, with g(site) the total derivative
dm/d(site) (one `site_grad` call)::

    dm/d(attn input, layer l) = g(blocks.l.hook_resid_pre) - g(blocks.l.hook_resid_mid)
    dm/d(MLP input, layer l)  = g(blocks.l.hook_resid_mid) - g(blocks.l.hook_resid_post)
    dm/d(unembedding input)   = g(blocks.{L-1}.hook_resid_post)

The receivers downstream of u telescope to the total derivative at u's output, so for every
sender and position, in every model, sum_v EAP(u -> v) = AtP(u) (up to float rounding).

**EAP-IG** (Hanna et al. 2024) replaces dm/d in_v by its average over the straight path of
the input embeddings from the base run to the source run (`ig.quadrature`, K nodes a_k with
weights w_k summing to 1): sum_k w_k dm/d in_v |_(embed_base + a_k (embed_source - embed_base)). The
embedding sender's edges then sum to integrated gradients on the input, whose completeness
gap sum - (m(source) - m(base)) is returned as the residual. Edge score arrays are
float32[B, U, V, T] with U = len(senders), V = len(receivers); edges from a sender to a
receiver that does not read it (not downstream) are exactly 0 (`edge_mask`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from toymesa.attribution import ig
from toymesa.attribution.core import Metric, forward, site_grad, site_shapes
from toymesa.attribution.patching import base_and_source, layer_sites
from toymesa.config import Config
from toymesa.model import Intervention


class AtP(NamedTuple):
    scores: dict  # {site: float32[site shape]}: (a_source - a_base) * dm/da, elementwise, per example
    delta: dict  # {site: a_source - a_base}
    grads: dict  # {site: dm/da at the base run}, row b the gradient of example b's metric
    base: jax.Array  # float32[B]: m(base input)
    source: jax.Array  # float32[B]: m(source input)


def atp(cfg: Config, params, clean, corrupt, metric: Metric, direction: str = "denoise", sites=None) -> AtP:
    """AtP at `sites` (default: every site of the model) from one forward pass per input and
    one backward pass. tokens int32[B, T]; scores keep each site's shape, row b for example b.
    With every site (or `edge_sites`), ``edges(cfg, params, r.delta, r.grads)`` is EAP at no
    further cost."""
    base, source = base_and_source(direction, clean, corrupt)
    sites = list(site_shapes(cfg, base)) if sites is None else list(sites)
    m_src, src_cache = forward(cfg, params, source, metric)
    m_base, base_cache, grads = site_grad(cfg, params, base, metric, sites)
    delta = {s: src_cache[s] - base_cache[s] for s in sites}
    return AtP({s: delta[s] * grads[s] for s in sites}, delta, grads, m_base, m_src)


def grid(cfg: Config, scores: dict, kind: str) -> jax.Array:
    """Elementwise scores of `kind`'s sites summed to the patching grid: float32[B, L, T, H]
    for hook_z (summed over d_head), float32[B, L, T] otherwise (summed over d_model)."""
    return jnp.stack([scores[s].sum(-1) for s in layer_sites(cfg, kind)], axis=1)


# ----------------------------------------------------------------- edges
def _stages(cfg: Config):
    """Where each sender writes and each receiver reads, in residual-stream order."""
    L, H, mlp = cfg.model.n_layers, cfg.model.n_heads, not cfg.model.attn_only
    send = [("embed", 0)]
    read = []
    for layer in range(L):
        send += [(f"L{layer}.H{h}", 2 * layer + 1) for h in range(H)]
        read.append((f"L{layer}.attn_in", 2 * layer + 1))
        if mlp:
            send.append((f"L{layer}.mlp", 2 * layer + 2))
            read.append((f"L{layer}.mlp_in", 2 * layer + 2))
    read.append(("logits", 2 * L + 1))
    return send, read


def senders(cfg: Config) -> tuple[str, ...]:
    """Sender names in order: embed, L{l}.H{h} for each head, L{l}.mlp (with MLPs)."""
    return tuple(n for n, _ in _stages(cfg)[0])


def receivers(cfg: Config) -> tuple[str, ...]:
    """Receiver names in order: L{l}.attn_in, L{l}.mlp_in (with MLPs), then logits."""
    return tuple(n for n, _ in _stages(cfg)[1])


def edge_mask(cfg: Config) -> np.ndarray:
    """bool[U, V]: receiver v reads sender u (u writes the stream before v reads it)."""
    send, read = _stages(cfg)
    return np.array([[s < r for _, r in read] for _, s in send])


def _sender_outputs(cfg: Config, params, values: dict) -> jax.Array:
    """What each sender writes into the residual stream, float32[B, U, T, D], from the values
    (or differences of values) at the sender sites; linear in them, biases left out (they
    cancel in differences)."""
    H, Dh = cfg.model.n_heads, cfg.model.d_head
    out = [values["hook_embed"] + values["hook_pos_embed"]]
    for layer in range(cfg.model.n_layers):
        w_o = params["blocks"][layer]["attn"]["out"]["kernel"][...].reshape(H, Dh, -1)
        out += list(jnp.einsum("bthe,hed->hbtd", values[f"blocks.{layer}.attn.hook_z"], w_o))
        if not cfg.model.attn_only:
            out.append(values[f"blocks.{layer}.hook_mlp_out"])
    return jnp.stack(out, axis=1)


def edge_sites(cfg: Config) -> list[str]:
    """The sites `edges` reads: the senders' outputs and the residual stream around each block."""
    send = ["hook_embed", "hook_pos_embed"] + [s for layer in range(cfg.model.n_layers) for s in _node_sites(cfg, layer)]
    return send + [f"blocks.{layer}.hook_resid_{x}" for layer in range(cfg.model.n_layers) for x in ("pre", "mid", "post")]


def _node_sites(cfg: Config, layer: int) -> list[str]:
    return [f"blocks.{layer}.attn.hook_z"] + ([] if cfg.model.attn_only else [f"blocks.{layer}.hook_mlp_out"])


def _receiver_grads(cfg: Config, g: dict) -> jax.Array:
    """dm/d in_v for every receiver, float32[B, V, T, D], from total derivatives (module docstring)."""
    out = []
    for layer in range(cfg.model.n_layers):
        pre, mid, post = (g[f"blocks.{layer}.hook_resid_{x}"] for x in ("pre", "mid", "post"))
        out.append(pre - mid)
        if not cfg.model.attn_only:
            out.append(mid - post)
    out.append(g[f"blocks.{cfg.model.n_layers - 1}.hook_resid_post"])
    return jnp.stack(out, axis=1)


def edges(cfg: Config, params, delta: dict, grads: dict) -> jax.Array:
    """Edge scores float32[B, U, V, T] = Delta out_u . dm/d in_v from site differences `delta`
    and gradients `grads` at (at least) `edge_sites`, e.g. an `atp` result's; edges a receiver
    does not read are exactly 0."""
    scores = jnp.einsum("butd,bvtd->buvt", _sender_outputs(cfg, params, delta), _receiver_grads(cfg, grads))
    return scores * jnp.asarray(edge_mask(cfg))[None, :, :, None]


def eap(cfg: Config, params, clean, corrupt, metric: Metric, direction: str = "denoise") -> jax.Array:
    """EAP edge scores float32[B, U, V, T] (module docstring), gradients at the base run."""
    a = atp(cfg, params, clean, corrupt, metric, direction, edge_sites(cfg))
    return edges(cfg, params, a.delta, a.grads)


def eap_ig(
    cfg: Config, params, clean, corrupt, metric: Metric, direction: str = "denoise", steps: int = 8, rule: str = "gauss_legendre", batch: int | None = None
):
    """(EAP-IG edge scores float32[B, U, V, T], completeness residual float32[B]).

    Receiver gradients are averaged over `steps` nodes of `rule` on the path of the input
    embeddings (``hook_embed``) from the base run to the source run; the nodes run as one
    vmap, or `batch` at a time (`lax.map`). residual_b = sum_{v, t} score_b(embed -> v) -
    (m_b(source) - m_b(base)): the quadrature error of IG on the input (0 for exact IG).
    With steps=1, rule="riemann_left" this is `eap`.
    """
    base, source = base_and_source(direction, clean, corrupt)
    sites = edge_sites(cfg)
    m_base, base_cache = forward(cfg, params, base, metric)
    m_src, src_cache = forward(cfg, params, source, metric)
    e0, e1 = base_cache["hook_embed"], src_cache["hook_embed"]
    nodes, weights = ig.quadrature(steps, rule)

    def grads_at(alpha):
        return site_grad(cfg, params, base, metric, sites, {"hook_embed": Intervention(replace=e0 + alpha * (e1 - e0))})[2]

    alphas = jnp.asarray(nodes, jnp.float32)
    g = jax.vmap(grads_at)(alphas) if batch is None else jax.lax.map(grads_at, alphas, batch_size=batch)
    w = jnp.asarray(weights, jnp.float32)
    avg = jax.tree.map(lambda x: jnp.tensordot(w, x, axes=1), g)
    delta = {s: src_cache[s] - base_cache[s] for s in sites}
    scores = edges(cfg, params, delta, avg)
    return scores, scores[:, 0].sum((1, 2)) - (m_src - m_base)
