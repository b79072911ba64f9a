import os

# Tests run on the CPU; keep JAX from probing for accelerators.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Cached feature networks (the FashionCNN) go to a fresh directory, not the user's cache.
if "DIT_SCALING_CACHE" not in os.environ:
    import tempfile

    os.environ["DIT_SCALING_CACHE"] = tempfile.mkdtemp(prefix="dit-scaling-cache-")
