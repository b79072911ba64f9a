import os
import tempfile

# Two test workers share two cores: a library that starts a thread per core (OpenBLAS under numpy and scipy,
# OpenMP under torch) spins its idle threads on the core the other worker holds, which took the paper-figures
# notebook from 22 s to 51 s of CPU (docs/benchmarks.md, "The test suite"). One thread each, in every process
# tests start, set before numpy is first imported (run_helpers imports it).
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import pytest  # noqa: E402
from run_helpers import write_small_fashion_mnist  # noqa: E402  (imports no JAX: the settings below still apply)

# Tests run on the CPU; keep JAX from probing for accelerators.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Cached feature networks (the FashionCNN) go to a fresh directory, not the user's cache.
if "DIT_SCALING_CACHE" not in os.environ:
    os.environ["DIT_SCALING_CACHE"] = tempfile.mkdtemp(prefix="dit-scaling-cache-")

# One persistent XLA cache for the session, shared with the subprocesses tests start: the same train step,
# sampler or feature network compiled by one test is loaded by the next instead of compiled again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["DIT_SCALING_CACHE"], "jax"))
# Small programs too (a random FID Inception compiles one sampler per kernel shape, 94 in all).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Tests compile far more than they run: without LLVM's optimisations XLA:CPU compiles a third faster (docs/
# benchmarks.md, "The test suite"). Results may differ in their last bits from an optimised build's, so a test's
# processes share these flags (run_helpers.environment).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    """A small dataset in Fashion-MNIST's IDX layout (run_helpers.write_small_fashion_mnist)."""
    return write_small_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="session")
def gcs():
    """A local GCS emulator (one per test process: clients keep the endpoint they first saw), with this process
    and the commands tests start pointed at it."""
    import fsspec
    from run_helpers import GcsEmulator

    emulator = GcsEmulator()
    saved = {k: os.environ.get(k) for k in emulator.environment}
    os.environ.update(emulator.environment)
    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"  # read from the environment when fsspec was imported
    yield emulator
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    emulator.close()


@pytest.fixture(params=["local", "gs"])
def storage_root(request, tmp_path):
    """A directory on the local disk, then one on the GCS emulator: a test taking it runs on both."""
    from etils import epath

    if request.param == "local":
        return epath.Path(tmp_path)
    return epath.Path(request.getfixturevalue("gcs").path(request.node.name.replace("[", "-").rstrip("]")))
