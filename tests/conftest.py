import os

# Tests run on the CPU; keep JAX from probing for accelerators.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Cached feature networks (the FashionCNN) go to a fresh directory, not the user's cache.
if "DIT_SCALING_CACHE" not in os.environ:
    import tempfile

    os.environ["DIT_SCALING_CACHE"] = tempfile.mkdtemp(prefix="dit-scaling-cache-")

# One persistent XLA cache for the session, shared with the subprocesses tests start: the same train step,
# sampler or feature network compiled by one test is loaded by the next instead of compiled again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["DIT_SCALING_CACHE"], "jax"))
# Small programs too (a random FID Inception compiles one sampler per kernel shape, 94 in all).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
