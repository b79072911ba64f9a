"""Gaussian diffusion against closed forms and hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.diffusion import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    space_timesteps,
)

DIFFUSION = GaussianDiffusion(linear_betas(1000))


def test_linear_schedule():
    betas = linear_betas(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02) and len(betas) == 1000
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)


def test_q_moments_against_products_of_alphas():
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 4, 2)), jnp.float32)
    for step in (0, 10, 500, 999):
        alpha_bar = math.prod(1 - b for b in linear_betas(1000)[: step + 1])
        t = jnp.full((3,), step)
        mean, variance, log_variance = DIFFUSION.q_mean_variance(x0, t)
        np.testing.assert_allclose(mean, math.sqrt(alpha_bar) * x0, rtol=1e-5)
        np.testing.assert_allclose(variance, 1 - alpha_bar, rtol=1e-5)
        np.testing.assert_allclose(log_variance, math.log(1 - alpha_bar), rtol=1e-5)


def test_q_sample_has_the_stated_moments():
    n, step = 200_000, 300
    x0 = jnp.full((n, 1, 1, 1), 0.7)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    xt = DIFFUSION.q_sample(x0, jnp.full((n,), step), noise)
    alpha_bar = DIFFUSION.table("alphas_cumprod")[step]
    assert float(xt.mean()) == pytest.approx(math.sqrt(alpha_bar) * 0.7, abs=0.01)
    assert float(xt.var()) == pytest.approx(1 - alpha_bar, rel=0.01)


def test_posterior_matches_gaussian_conditioning():
    # q(x_{t-1} | x_t, x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}).
    betas = linear_betas(1000)
    rng = np.random.default_rng(1)
    x0, xt = rng.standard_normal((2, 5, 2, 2, 1))
    for step in (1, 7, 400, 999):
        a, b = 1 - betas[step], betas[step]
        abar_prev = math.prod(1 - betas[: step])
        precision = a / b + 1 / (1 - abar_prev)
        mean = (math.sqrt(a) / b * xt + math.sqrt(abar_prev) / (1 - abar_prev) * x0) / precision
        t = jnp.full((5,), step)
        ours_mean, ours_var, ours_logvar = DIFFUSION.q_posterior_mean_variance(jnp.asarray(x0, jnp.float32),
                                                                              jnp.asarray(xt, jnp.float32), t)
        np.testing.assert_allclose(ours_mean, mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours_var, 1 / precision, rtol=1e-5)
        np.testing.assert_allclose(ours_logvar, math.log(1 / precision), rtol=1e-5)


def test_normal_kl_hand_computed():
    # KL(N(0,1) || N(1,4)) = log 2 + (1 + 1) / 8 - 1/2.
    assert float(normal_kl(0.0, 0.0, 1.0, math.log(4.0))) == pytest.approx(math.log(2) + 0.25 - 0.5, rel=1e-6)
    assert float(normal_kl(0.3, -1.0, 0.3, -1.0)) == pytest.approx(0.0, abs=1e-7)


def test_discretized_gaussian_likelihood_against_exact_cdf():
    def phi(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    for x, mean, log_scale in [(0.0, 0.0, 0.0), (0.5, 0.4, -2.0), (-1.0, -0.9, -1.0), (1.0, 0.95, -3.0)]:
        s = math.exp(log_scale)
        upper = 1.0 if x > 0.999 else phi((x - mean + 1 / 255) / s)
        lower = 0.0 if x < -0.999 else phi((x - mean - 1 / 255) / s)
        expected = math.log(upper - lower)
        ours = float(discretized_gaussian_log_likelihood(jnp.float32(x), jnp.float32(mean), jnp.float32(log_scale)))
        # ADM approximates the normal CDF with tanh: agreement to about 1e-3 relative in probability.
        assert ours == pytest.approx(expected, abs=2e-3)


def test_respacing_rules():
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    steps250 = space_timesteps(1000, "250")
    assert len(steps250) == 250 and steps250[0] == 0 and steps250[-1] == 999
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    with pytest.raises(ValueError, match="Cannot take"):
        space_timesteps(100, "ddim33")


def test_respacing_to_all_steps_is_the_identity():
    full = DIFFUSION.respace(1000)
    np.testing.assert_allclose(full.betas, DIFFUSION.betas, rtol=1e-10)
    np.testing.assert_array_equal(full.timestep_map, np.arange(1000))


def test_respaced_process_keeps_the_marginals():
    short = DIFFUSION.respace("25")
    np.testing.assert_allclose(short.table("alphas_cumprod"),
                               DIFFUSION.table("alphas_cumprod")[short.timestep_map], rtol=1e-10)


def test_losses_vanish_for_a_perfect_model():
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.uniform(-1, 1, (6, 4, 4, 3)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    t = jnp.array([1, 5, 100, 500, 900, 999])

    def oracle(x_t, t_model):
        # Predicts the true noise; v = -1 selects the (true) posterior variance for t >= 1.
        return jnp.concatenate([noise, -jnp.ones_like(noise)], axis=-1)

    terms = DIFFUSION.training_losses(oracle, x0, t, noise)
    np.testing.assert_allclose(terms["mse"], 0.0, atol=1e-12)
    np.testing.assert_allclose(terms["vb"], 0.0, atol=2e-3)
    assert set(terms) == {"loss", "mse", "vb"}


def test_vb_at_step_zero_is_the_decoder_nll():
    # At t = 0 the posterior mean is the predicted x_0 itself; the model's variance interpolates between beta_0
    # and the clipped posterior variance (that of t = 1). The reference uses the exact normal CDF.
    from scipy.stats import norm

    rng = np.random.default_rng(4)
    x0 = rng.uniform(-0.95, 0.95, (3, 4, 4, 1))
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0  # the edge bins reach to -inf and +inf
    betas = linear_betas(1000)
    abar0, abar1 = 1 - betas[0], (1 - betas[0]) * (1 - betas[1])
    true_eps = rng.standard_normal(x0.shape)
    x_t = np.sqrt(abar0) * x0 + np.sqrt(1 - abar0) * true_eps
    eps, v = true_eps + 0.3 * rng.standard_normal(x0.shape), rng.uniform(-1, 1, x0.shape)
    got = DIFFUSION.vb_terms_bpd(jnp.asarray(np.concatenate([eps, v], -1), jnp.float32), jnp.asarray(x0, jnp.float32),
                                 jnp.asarray(x_t, jnp.float32), jnp.zeros(3, jnp.int32))

    mean = x_t / np.sqrt(abar0) - np.sqrt(1 / abar0 - 1) * eps
    frac = (v + 1) / 2
    sigma = np.exp(0.5 * (frac * np.log(betas[0]) + (1 - frac) * np.log(betas[1] * (1 - abar0) / (1 - abar1))))
    upper = np.where(x0 > 0.999, 1.0, norm.cdf((x0 + 1 / 255 - mean) / sigma))
    lower = np.where(x0 < -0.999, 0.0, norm.cdf((x0 - 1 / 255 - mean) / sigma))
    expected = -np.log(upper - lower).mean(axis=(1, 2, 3)) / math.log(2)
    np.testing.assert_allclose(got, expected, rtol=2e-3)  # ADM's tanh approximation of the CDF


def test_vb_gradient_does_not_reach_the_mean():
    x0 = jnp.zeros((2, 2, 2, 1))
    noise = jnp.ones_like(x0)
    t = jnp.array([3, 600])

    def vb_only(eps_and_var):
        return DIFFUSION.training_losses(lambda x, tt: eps_and_var, x0, t, noise)["vb"].sum()

    grad = jax.grad(vb_only)(jnp.concatenate([0.5 * noise, 0.2 * noise], axis=-1))
    assert float(jnp.abs(grad[..., :1]).max()) == 0.0 and float(jnp.abs(grad[..., 1:]).max()) > 0.0


@pytest.mark.parametrize(("steps", "sampler"), [("ddim500", "ddim"), ("250", "ddpm"), ("1000", "ddpm")])
def test_sampling_a_gaussian_with_the_exact_denoiser(steps, sampler):
    # Data N(0, s^2): the exact eps-prediction is sqrt(1 - abar) x_t / (abar s^2 + 1 - abar).
    s2 = 0.25
    process = GaussianDiffusion(linear_betas(1000), learn_sigma=False).respace(steps)
    abar_by_t = jnp.asarray(DIFFUSION.table("alphas_cumprod"), jnp.float32)

    def exact(x_t, t):
        abar = abar_by_t[t][:, None, None, None]
        return jnp.sqrt(1 - abar) * x_t / (abar * s2 + 1 - abar)

    noise = jax.random.normal(jax.random.key(0), (4000, 2, 2, 1))
    samples = jax.jit(lambda z: process.sample(exact, z, jax.random.key(1), sampler=sampler))(noise)
    assert float(samples.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(samples.var()) == pytest.approx(s2, rel=0.05)


def test_learned_sigma_sampling_spans_the_two_variances():
    # v = +1 selects beta_t, the fixed variance of a model without learned sigma (the last step adds no noise,
    # where the two differ); v = -1 selects the smaller posterior variance: less noise, slightly narrower samples.
    s2 = 0.25
    fixed = GaussianDiffusion(linear_betas(1000), learn_sigma=False).respace("250")
    learned = GaussianDiffusion(linear_betas(1000)).respace("250")
    abar_by_t = jnp.asarray(DIFFUSION.table("alphas_cumprod"), jnp.float32)

    def exact(x_t, t):
        abar = abar_by_t[t][:, None, None, None]
        return jnp.sqrt(1 - abar) * x_t / (abar * s2 + 1 - abar)

    def with_variance_values(v):
        return lambda x_t, t: jnp.concatenate([exact(x_t, t), jnp.full_like(x_t, v)], axis=-1)

    noise = jax.random.normal(jax.random.key(0), (4000, 2, 2, 1))
    sample = jax.jit(lambda process, fn: process.sample(fn, noise, jax.random.key(1)), static_argnums=(0, 1))
    large = sample(learned, with_variance_values(1.0))
    np.testing.assert_allclose(large, sample(fixed, exact), atol=1e-5)
    small = sample(learned, with_variance_values(-1.0))
    assert 0.9 * s2 < float(small.var()) < float(large.var())


def test_ddim_recovers_a_point_mass_exactly():
    c = 0.3
    process = GaussianDiffusion(linear_betas(1000), learn_sigma=False).respace("ddim50")
    abar_by_t = jnp.asarray(DIFFUSION.table("alphas_cumprod"), jnp.float32)

    def exact(x_t, t):
        abar = abar_by_t[t][:, None, None, None]
        return (x_t - jnp.sqrt(abar) * c) / jnp.sqrt(1 - abar)

    noise = jax.random.normal(jax.random.key(0), (8, 3, 3, 2))
    samples = process.sample(exact, noise, jax.random.key(1), sampler="ddim")
    np.testing.assert_allclose(samples, c, atol=1e-3)


def test_sampling_is_one_scan():
    process = DIFFUSION.respace("ddim10")
    jaxpr = jax.make_jaxpr(lambda z: process.sample(lambda x, t: jnp.concatenate([x, x], -1), z,
                                                    jax.random.key(0)))(jnp.zeros((1, 2, 2, 1)))
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns].count("scan") == 1


def test_guided_model_fn_at_scale_one_is_the_conditional_model():
    from flax import nnx

    from models.diffusion import guided_model_fn
    from models.dit import DiT, DiTConfig

    model = DiT(DiTConfig(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=4, num_classes=5),
                rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: 0.1 * jax.random.normal(jax.random.key(1), p.shape), params))
    x = jax.random.normal(jax.random.key(2), (3, 4, 4, 4))
    t, y = jnp.array([5, 50, 500]), jnp.array([0, 3, 4])
    # Compiled: eagerly, every operation of a first call compiles on its own.
    forward = nnx.jit(lambda model, labels: model(x, t, labels))
    guided = nnx.jit(lambda model, scale, channels: guided_model_fn(model, y, scale, null_label=5, in_channels=4,
                                                                    cfg_channels=channels)(x, t),
                     static_argnames="channels")
    for channels in (3, None):
        np.testing.assert_allclose(guided(model, 1.0, channels=channels), forward(model, y), atol=1e-5)
    unguided = forward(model, jnp.full_like(y, 5))
    np.testing.assert_allclose(guided(model, 4.0, channels=None)[..., :4],
                               unguided[..., :4] + 4.0 * (forward(model, y) - unguided)[..., :4], atol=1e-4)


# -- DPM-Solver++(2M) -------------------------------------------------------------------------------------------

S2, MU = 0.25, 0.3  # data N(MU, S2): the probability-flow ODE maps x_T to MU + sqrt(S2) (x_T - a_T MU) / sd(x_T)


def _gaussian_eps(abar, x_t):
    """The exact eps-prediction for data N(MU, S2) at noise level abar (numpy or jax)."""
    return (1 - abar) ** 0.5 * (x_t - abar ** 0.5 * MU) / (abar * S2 + 1 - abar)


def _exact_ode_solution(noise):
    abar = DIFFUSION.table("alphas_cumprod")[-1]
    return MU + np.sqrt(S2) * (noise - np.sqrt(abar) * MU) / np.sqrt(abar * S2 + 1 - abar)


def _solve(sampler, steps, noise, learn_sigma=False):
    process = GaussianDiffusion(linear_betas(1000), learn_sigma=learn_sigma).for_sampler(sampler, steps)
    abar_by_t = jnp.asarray(DIFFUSION.table("alphas_cumprod"), jnp.float32)

    def model_fn(x_t, t):
        eps = _gaussian_eps(abar_by_t[t][:, None, None, None], x_t)
        return jnp.concatenate([eps, jnp.full_like(x_t, 0.7)], -1) if learn_sigma else eps

    return np.asarray(jax.jit(lambda z: process.sample(model_fn, z, jax.random.key(1), sampler=sampler))(noise))


def test_dpm_solver_pp_takes_the_steps_diffusers_takes():
    import diffusers
    import torch

    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", solver_order=2,
        algorithm_type="dpmsolver++", prediction_type="epsilon", final_sigmas_type="zero")
    noise = np.asarray(jax.random.normal(jax.random.key(0), (16, 3, 3, 1)), np.float32)
    abar = np.cumprod(1 - linear_betas(1000))
    for steps in (2, 5, 12, 20):
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == sorted(
            GaussianDiffusion(linear_betas(1000)).for_sampler("dpm-solver++", steps).timestep_map, reverse=True)
        x = torch.from_numpy(noise)
        for t in scheduler.timesteps:
            x = scheduler.step(torch.from_numpy(_gaussian_eps(abar[int(t)], x.numpy())), t, x).prev_sample
        # float32 throughout there, float64 coefficients here: equal to about 1e-6 of the sample's scale.
        np.testing.assert_allclose(_solve("dpm-solver++", steps, noise), x.numpy(), atol=2e-5, rtol=1e-4)


def test_dpm_solver_pp_converges_at_second_order_where_ddim_is_first():
    noise = np.asarray(jax.random.normal(jax.random.key(0), (64, 2, 2, 1)), np.float32)
    exact = _exact_ode_solution(noise)

    def error(sampler, steps):
        return float(np.abs(_solve(sampler, steps, noise) - exact).max())

    dpm, ddim = [error("dpm-solver++", k) for k in (20, 40)], [error("ddim", k) for k in (20, 40)]
    assert dpm[1] < 1e-2 and dpm[1] < ddim[1] / 10 and dpm[0] < ddim[0] / 2
    assert dpm[0] / dpm[1] > 4  # at least 4 for a second-order method; DDIM's error halves
    assert 1.5 < ddim[0] / ddim[1] < 2.5
    # A learned-sigma model's variance channels are ignored: the ODE needs eps alone.
    np.testing.assert_allclose(_solve("dpm-solver++", 10, noise, learn_sigma=True),
                               _solve("dpm-solver++", 10, noise), atol=1e-6)


def test_dpm_solver_pp_is_one_scan_of_one_model_call_per_step():
    process = DIFFUSION.for_sampler("dpm-solver++", 7)
    calls = []

    def model_fn(x, t):
        calls.append(t)
        return jnp.concatenate([x, x], -1)

    jaxpr = jax.make_jaxpr(lambda z: process.sample(model_fn, z, jax.random.key(0), sampler="dpm-solver++"))(
        jnp.zeros((1, 2, 2, 1)))
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns].count("scan") == 1 and len(calls) == 1
    assert process.num_timesteps == 7 and process.timestep_map.tolist() == [143, 285, 428, 571, 714, 856, 999]
