"""Which of the 1000 training timesteps a sampler visits: ADM's respacing ("250", "10,15,20"), DDIM's stride
("ddim50") and DPM-Solver++'s spacing. Without JAX, so that the command line can name the samplers."""

from collections.abc import Sequence

import numpy as np

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")


def sampling_timesteps(sampler: str, steps: int, num_timesteps: int = 1000) -> list[int]:
    """The original timesteps at which `sampler` evaluates the model in `steps` steps (sorted): ADM's spacing for
    DDPM, DDIM's stride, and for DPM-Solver++ diffusers' "linspace" spacing (from T - 1 down to about T / steps:
    its last step goes from there to the data, so no evaluation is spent at t = 0)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}.")
    if sampler == "ddim":
        return space_timesteps(num_timesteps, f"ddim{steps}")
    if sampler == "ddpm":
        return space_timesteps(num_timesteps, steps)
    if not 2 <= steps < num_timesteps:
        raise ValueError(f"DPM-Solver++ takes 2 to {num_timesteps - 1} steps, got {steps}.")
    return sorted(set(np.linspace(0, num_timesteps - 1, steps + 1).round().astype(int)[1:].tolist()))


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """ADM's respacing rule: which of the original timesteps a shortened sampler visits (sorted).

    `section_counts` is "ddimN" (N evenly strided steps starting at 0), an int or comma-separated string such as
    "250" or "10,15,20" (the schedule is cut into equal sections, each spaced evenly with that many steps).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"Cannot take exactly {desired} evenly strided steps out of {num_timesteps}.")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"Cannot take {count} steps from a section of {size} timesteps.")
        if count < 1:
            raise ValueError(f"Every section needs at least one step, got {count}.")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))
