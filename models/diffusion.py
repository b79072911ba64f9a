"""Gaussian diffusion as DiT uses it (ADM / Improved DDPM conventions).

T = 1000 steps with a linear beta schedule (1e-4 to 0.02); the model predicts epsilon and, when sigma is learned,
a value v in [-1, 1] per channel that interpolates the log-variance between the clipped posterior log-variance
and log beta_t. Training loss = MSE(eps) + the variational-bound term (KL in bits per dimension with the mean
held fixed; the discretised-Gaussian decoder NLL at t = 0). Sampling respaces the schedule with ADM's rule
("250" steps, "ddim50", ...) and runs as one `jax.lax.scan` over the steps: ancestral DDPM, DDIM (eta), or
DPM-Solver++(2M) (Lu et al. 2022: the second-order multistep solver of the probability-flow ODE in data prediction,
as diffusers' DPMSolverMultistepScheduler runs it), which nears what the model can do in 10-20 steps where DDIM
needs hundreds.

Schedules are computed in float64 with numpy and used in float32, as ADM does. Images are NHWC.
A `model_fn(x_t, t)` maps noisy inputs and integer timesteps of the ORIGINAL schedule to the model output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.timesteps import SAMPLERS, sampling_timesteps, space_timesteps

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """ADM's linear schedule: 1e-4 to 0.02 over 1000 steps, rescaled for other step counts."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """ADM's tanh approximation of the standard normal CDF (kept for identical likelihoods)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-probability of data in [-1, 1] quantised to 256 levels under a Gaussian, elementwise (nats)."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """A (possibly respaced) diffusion process. `timestep_map[i]` is the original timestep of step i."""

    betas: np.ndarray
    learn_sigma: bool = True
    timestep_map: np.ndarray | None = None

    def __post_init__(self):
        betas = np.asarray(self.betas, np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must be a 1-D array in (0, 1].")
        object.__setattr__(self, "betas", betas)
        if self.timestep_map is None:
            object.__setattr__(self, "timestep_map", np.arange(len(betas)))
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "one_minus_alphas_cumprod": 1.0 - ac,
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": posterior_variance,
            # The posterior variance is 0 at t = 0: clip its log to the value at t = 1.
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_betas": np.log(betas),
            # DiT's fixed variance without learned sigma ("fixed large").
            "fixed_large_log_variance": np.log(np.append(posterior_variance[1], betas[1:])),
        }
        object.__setattr__(self, "_tables", tables)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def table(self, name: str) -> np.ndarray:
        return self._tables[name]

    def _at(self, name: str, t, x):
        """Coefficient `name` at integer steps t [N], shaped to broadcast against x [N, ...]."""
        values = jnp.asarray(self._tables[name], jnp.float32)[t]
        return values.reshape(values.shape + (1,) * (x.ndim - 1))

    # -- forward process ------------------------------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        mean = self._at("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = jnp.broadcast_to(self._at("one_minus_alphas_cumprod", t, x_start), x_start.shape)
        log_variance = jnp.broadcast_to(self._at("log_one_minus_alphas_cumprod", t, x_start), x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise):
        return (self._at("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = self._at("posterior_mean_coef1", t, x_t) * x_start + self._at("posterior_mean_coef2", t, x_t) * x_t
        variance = jnp.broadcast_to(self._at("posterior_variance", t, x_t), x_t.shape)
        log_variance = jnp.broadcast_to(self._at("posterior_log_variance_clipped", t, x_t), x_t.shape)
        return mean, variance, log_variance

    # -- reverse process ------------------------------------------------------------------------------------------

    def p_mean_variance(self, model_output, x_t, t, *, clip_denoised: bool = False):
        """Mean, log-variance and predicted x_0 of p(x_{t-1} | x_t) from the model output at step t."""
        channels = x_t.shape[-1]
        if self.learn_sigma:
            if model_output.shape[-1] != 2 * channels:
                raise ValueError(f"A learned-sigma model must output {2 * channels} channels, got "
                                 f"{model_output.shape[-1]}.")
            eps, var_values = model_output[..., :channels], model_output[..., channels:]
            min_log = self._at("posterior_log_variance_clipped", t, x_t)
            max_log = self._at("log_betas", t, x_t)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            eps = model_output
            log_variance = jnp.broadcast_to(self._at("fixed_large_log_variance", t, x_t), x_t.shape)
        pred_xstart = self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t \
            - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return mean, log_variance, pred_xstart, eps

    # -- training -------------------------------------------------------------------------------------------------

    def training_losses(self, model_fn: ModelFn, x_start, t, noise) -> dict[str, jax.Array]:
        """Per-example loss terms at steps t: {"loss", "mse", "vb"} (vb only with learned sigma)."""
        x_t = self.q_sample(x_start, t, noise)
        model_output = model_fn(x_t, jnp.asarray(self.timestep_map)[t])
        channels = x_start.shape[-1]
        mse = _mean_flat((noise - model_output[..., :channels]) ** 2)
        if not self.learn_sigma:
            return {"loss": mse, "mse": mse}
        # The VB term trains only the variance: the mean's gradient comes from the MSE term alone.
        frozen = jnp.concatenate([jax.lax.stop_gradient(model_output[..., :channels]),
                                  model_output[..., channels:]], axis=-1)
        vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dimension; decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        mean, log_variance, _, _ = self.p_mean_variance(model_output, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)) / math.log(2.0)
        return jnp.where(t == 0, nll, kl)

    # -- respacing and sampling -----------------------------------------------------------------------------------

    def respace(self, steps: str | int | Sequence[int]) -> GaussianDiffusion:
        """The process restricted to ADM-respaced steps (see `space_timesteps`); 1000 of 1000 is the identity."""
        return self.restricted_to(space_timesteps(self.num_timesteps, steps))

    def for_sampler(self, sampler: str, steps: int) -> GaussianDiffusion:
        """The process that `sample(..., sampler=sampler)` runs in `steps` model evaluations."""
        return self.restricted_to(sampling_timesteps(sampler, steps, self.num_timesteps))

    def restricted_to(self, use: Sequence[int]) -> GaussianDiffusion:
        """The process visiting only the steps `use` (sorted) of this one, with the betas that keep alphas_cumprod
        at each of them."""
        ac = self.table("alphas_cumprod")
        last, betas = 1.0, []
        for i in use:
            betas.append(1.0 - ac[i] / last)
            last = ac[i]
        return GaussianDiffusion(np.array(betas), learn_sigma=self.learn_sigma,
                                 timestep_map=np.asarray(self.timestep_map)[list(use)])

    def sample(self, model_fn: ModelFn, noise, key, *, sampler: str = "ddpm", eta: float = 0.0,
               clip_denoised: bool = False):
        """Draw samples from x_T = `noise`, over all steps of this (respaced) process, as one lax.scan.

        sampler "ddpm" is ancestral sampling (ADM p_sample); "ddim" uses eta (0 = deterministic); "dpm-solver++"
        is deterministic DPM-Solver++(2M) (`key` and `eta` unused).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}.")
        if sampler == "dpm-solver++":
            return self._sample_dpm_solver_pp(model_fn, noise, clip_denoised=clip_denoised)
        timestep_map = jnp.asarray(self.timestep_map)
        n = noise.shape[0]

        def step(x, i):
            t = jnp.full((n,), i, jnp.int32)
            output = model_fn(x, timestep_map[t])
            mean, log_variance, pred_xstart, eps = self.p_mean_variance(output, x, t, clip_denoised=clip_denoised)
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            nonzero = (i > 0).astype(x.dtype)
            if sampler == "ddpm":
                return mean + nonzero * jnp.exp(0.5 * log_variance) * z, None
            if clip_denoised:  # re-derive eps from the clipped x_0, as ADM does
                eps = (self._at("sqrt_recip_alphas_cumprod", t, x) * x - pred_xstart) \
                    / self._at("sqrt_recipm1_alphas_cumprod", t, x)
            alpha_bar = self._at("alphas_cumprod", t, x)
            alpha_bar_prev = self._at("alphas_cumprod_prev", t, x)
            sigma = eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
            mean = pred_xstart * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps
            return mean + nonzero * sigma * z, None

        x, _ = jax.lax.scan(step, noise, jnp.arange(self.num_timesteps - 1, -1, -1))
        return x

    def _dpm_solver_pp_coefficients(self) -> np.ndarray:
        """[steps, 3]: x <- a x + c0 x0_now + c1 x0_before, from this process's last step down to the data.

        With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and h the step in lambda:
        a = sigma_next / sigma, b = alpha_next (1 - e^-h); the first and the last step are first order
        (c0 = b, c1 = 0), the others second order with r the previous step's h over this one's:
        c0 = b (1 + 1 / 2r), c1 = -b / 2r. The last step ends at sigma 0 (x = the predicted x_0)."""
        abar = self.table("alphas_cumprod")[::-1]
        alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
        lam = np.log(alpha) - np.log(sigma)
        rows, previous_h = [], None
        for j in range(len(abar)):
            if j == len(abar) - 1:
                a, b, h = 0.0, 1.0, np.inf
            else:
                h = lam[j + 1] - lam[j]
                a, b = sigma[j + 1] / sigma[j], alpha[j + 1] * -np.expm1(-h)
            if previous_h is None or np.isinf(h):
                rows.append((a, b, 0.0))
            else:
                r = previous_h / h
                rows.append((a, b * (1 + 0.5 / r), -b * 0.5 / r))
            previous_h = h
        return np.array(rows, np.float64)

    def _sample_dpm_solver_pp(self, model_fn: ModelFn, noise, *, clip_denoised: bool):
        timestep_map = jnp.asarray(self.timestep_map)
        coefficients = jnp.asarray(self._dpm_solver_pp_coefficients(), jnp.float32)
        n = noise.shape[0]

        def step(carry, inputs):
            x, x0_before = carry
            i, (a, c0, c1) = inputs
            t = jnp.full((n,), i, jnp.int32)
            _, _, x0, _ = self.p_mean_variance(model_fn(x, timestep_map[t]), x, t, clip_denoised=clip_denoised)
            return (a * x + c0 * x0 + c1 * x0_before, x0), None

        steps = jnp.arange(self.num_timesteps - 1, -1, -1)
        (x, _), _ = jax.lax.scan(step, (noise, jnp.zeros_like(noise)), (steps, tuple(coefficients.T)))
        return x


def guide(cond_out, uncond_out, cfg_scale: float, channels: int):
    """Classifier-free guidance of a model's outputs [N, H, W, C'] for the conditional and the null label:
    eps = eps_uncond + cfg_scale (eps_cond - eps_uncond) in the first `channels` channels; the other channels
    (the rest of eps in the paper's 3-channel mode, the variance values) are the conditional pass's."""
    guided = uncond_out[..., :channels] + cfg_scale * (cond_out[..., :channels] - uncond_out[..., :channels])
    return jnp.concatenate([guided, cond_out[..., channels:]], axis=-1)


def guided_model_fn(model, y, cfg_scale: float, *, null_label: int, in_channels: int,
                    cfg_channels: int | None = 3) -> ModelFn:
    """Classifier-free guided model function for labels y [N] of any model called as model(x, t, y) (a DiT or a
    plugged-in architecture): the batch runs conditionally and with the null label in one doubled batch, and the
    conditional half comes back guided in its first `cfg_channels` channels (3 reproduces the paper's numbers, a
    quirk of the official code; None guides all `in_channels` eps channels, the standard formulation)."""
    y_both = jnp.concatenate([y, jnp.full_like(y, null_label)])
    channels = in_channels if cfg_channels is None else cfg_channels
    if not 0 < channels <= in_channels:
        raise ValueError(f"cfg_channels must be in 1..{in_channels} or None, got {cfg_channels}.")

    def model_fn(x, t):
        cond, uncond = jnp.split(model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y_both), 2)
        return guide(cond, uncond, cfg_scale, channels)

    return model_fn
