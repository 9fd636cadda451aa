"""toymesa: small, fast, falsifiable experiments on mesa-optimization.

Axis glossary (used in every docstring and shape comment):
  N  population members (seeds x swept values)   B  batch
  T  sequence positions                          D  d_model
  H  attention heads                             Dh d_head
  M  d_mlp                                       V  vocabulary
"""

__version__ = "0.1.0"
