"""The names a spec or the command line may use for meters and for which models they measure
(a leaf module: the spec checker reads it without importing JAX-heavy code)."""

METER_NAMES = ("llc", "llc_act", "norm", "compress", "preq")
WHICH = ("final", "installed")  # the stored parameters / the models before safety training
