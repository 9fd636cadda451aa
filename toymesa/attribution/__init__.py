"""Attribution: where credit goes in one model, and where it goes while safety training changes it.

Every function is pure and works on one model; `jax.vmap` over a leading parameter axis
runs it on a population. Nothing mutates the model: interventions are arguments
(`toymesa.model.Intervention`) and intermediates are the cache the model returns.

Files (one concept each):

* ``core.py``      metrics (per-example scalars of the logits), the forward pass, gradients at sites
* ``ig.py``        quadrature rules; integrated gradients on any pytree; IG at a site
* ``gradients.py`` input gradients, gradient x (input - baseline), per-example and token-group gradients
* ``patching.py``  activation patching (one site, sweeps over layer x position x head), path patching
* ``atp.py``       attribution patching (AtP) at every site in one backward pass; EAP and EAP-IG
* ``reasoning.py`` soft (probability-fed) reasoning, stop-gradient at reasoning positions,
                   per-position gradient flow, the REINFORCE split into reasoning and answer terms
* ``decision.py``  m_dec and m_exec: the decision / execution split on a fixed probe set
* ``credit.py``    training-path attribution inside the safety-training scan (credit tracking)
* ``credit_table.py`` credit histories of a run folder as a DataFrame; credit reach
* ``probes.py``    linear probes: difference of means, logistic, contrast pair; AUROC and nulls
* ``command.py``   the `toymesa attribute` command: minimal pairs, patching / AtP / EAP tables, figure
* ``bench.py``     `toymesa bench --credit`: the cost of credit tracking

Glossary of axes: B batch, T positions, V vocabulary, D d_model, H heads, Dh d_head,
L layers, K quadrature nodes, P parameters (flattened). A *metric* maps (logits[B, T, V],
tokens[B, T]) to float32[B], one value per example; methods differentiate the sum over the
batch, which gives per-example attributions because examples do not interact.
"""
