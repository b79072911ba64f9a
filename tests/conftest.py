import os

# Tests run on the CPU; keep JAX from probing for accelerators.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
