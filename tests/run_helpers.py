"""Helpers of the training tests: a small Fashion-MNIST in its IDX files, and the command line as a user runs it."""

import gzip
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.depth=1", "model.hidden_size=32", "model.num_heads=1"]


def write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_small_fashion_mnist(directory: Path) -> Path:
    """A small dataset in Fashion-MNIST's IDX layout: class k images have mean brightness 20 k."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("t10k", 64)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.clip(rng.normal(20.0 * labels[:, None, None], 30, (n, 28, 28)), 0, 255).astype(np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    return directory


def environment(extra: dict | None) -> dict:
    """This process's environment with `extra`; XLA_FLAGS given there are added to the suite's own."""
    merged = {**os.environ, **(extra or {})}
    if extra and "XLA_FLAGS" in extra and os.environ.get("XLA_FLAGS"):
        merged["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {extra['XLA_FLAGS']}"
    return merged


def cli(*args, env=None, timeout=300):
    """`python -m scaling.cli ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "scaling.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=environment(env))


def start_on_hosts(*args, num_processes=2, env=None) -> list[subprocess.Popen]:
    """The same command started on `num_processes` simulated hosts joined through a coordinator on 127.0.0.1, as
    on a pod."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen(
        [sys.executable, "-m", "scaling.cli", *args, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
         str(num_processes), "--process-id", str(i)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=environment(env)) for i in range(num_processes)]


def finish_on_hosts(processes: list[subprocess.Popen], timeout=300) -> list[tuple[int, str, str]]:
    """Each process's (returncode, stdout, stderr) once all have ended."""
    outputs = [p.communicate(timeout=timeout) for p in processes]
    return [(p.returncode, *output) for p, output in zip(processes, outputs, strict=True)]


def cli_on_hosts(*args, num_processes=2, env=None, timeout=300):
    """`start_on_hosts`, then `finish_on_hosts`."""
    return finish_on_hosts(start_on_hosts(*args, num_processes=num_processes, env=env), timeout=timeout)


def smoke(fmnist_dir, *extra):
    """The arguments of a seconds-long S/8 run on the small dataset."""
    return ["--config", "fmnist:S/8,smoke", f"--config.data.path={fmnist_dir}", *extra]


def leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# A diffusers autoencoder small enough for tests: KL-f4 (three resolutions), every kind of KL-f8 layer.
TINY_AUTOENCODER = dict(block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)


def write_tiny_autoencoder(folder: Path, seed: int = 0) -> Path:
    """A diffusers AutoencoderKL with random weights (norms perturbed off their 1/0 init) saved as diffusers
    saves it: config.json and diffusion_pytorch_model.safetensors."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**TINY_AUTOENCODER).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def write_fake_imagenet(root: Path, num_classes: int = 3, per_class: int = 3, seed: int = 0) -> Path:
    """An ImageFolder tree of JPEG and PNG images of odd sizes (one grayscale), classes named like ImageNet's."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in range(num_classes):
        folder = root / f"n{label:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            height, width = rng.integers(40, 90, 2)
            pixels = np.clip(rng.normal(60 * label + 40, 40, (height, width, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels).convert("L") if (label, i) == (0, 0) else Image.fromarray(pixels)
            image.save(folder / (f"img{i}.png" if i % 2 else f"img{i}.JPEG"))
    return root


class GcsEmulator:
    """A Google Cloud Storage server on 127.0.0.1 (tests/gcs_emulator.py) with one bucket, and the
    environment that points every client at it: gcsfs and google-cloud-storage (STORAGE_EMULATOR_HOST) and
    tensorstore, under orbax's checkpoints (TENSORSTORE_GCS_HTTP_URL, with a token it sends unchecked)."""

    def __init__(self, bucket: str = "dit-scaling-test"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.bucket, self.url = bucket, f"http://127.0.0.1:{port}"
        self.environment = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                            # gcsfs: no credentials to look for, no control plane to ask for the bucket's layout
                            "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "gcs_emulator.py"), str(port), bucket],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.1)

    def path(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
