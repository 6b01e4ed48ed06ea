"""The denoising loop (dreamguide.denoise): its calls, callbacks, dtypes, per-image noise and the non-finite check."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

from dreamguide.denoise import NonFiniteCheck, NonFiniteError, denoise, initial_noise


def _scheduler(cls=DDIMScheduler, steps: int = 4):
    scheduler = cls(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    return scheduler


def test_combine_and_callbacks_see_the_step_and_the_step_count():
    scheduler = _scheduler(steps=3)
    seen, steps_seen = [], []

    def model(x_in, t):
        return torch.stack([x_in, 2 * x_in])  # "rows": anything combine reads

    def combine(output, i, steps):
        seen.append((i, steps))
        return output[1] - output[0]

    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = denoise(model, x0, scheduler, combine, callbacks=[steps_seen.append])
    assert seen == [(0, 3), (1, 3), (2, 3)]
    timesteps = [(i, 3, float(t)) for i, t in enumerate(scheduler.timesteps)]
    assert [(s.i, s.steps, float(s.t)) for s in steps_seen] == timesteps
    assert torch.equal(steps_seen[-1].x, x) and steps_seen[0].sigma is None  # DDIM has no sigmas
    assert torch.equal(steps_seen[0].guided, x0)  # scale_model_input is the identity for DDIM
    # The same steps written out: the loop adds nothing of its own.
    manual, reference = _scheduler(steps=3), x0
    for t in manual.timesteps:
        reference = manual.step(reference, t, reference).prev_sample
    assert torch.equal(x, reference)


def test_the_sample_keeps_its_dtype_and_the_scheduler_steps_in_float32():
    scheduler = _scheduler()
    dtypes = []
    step = scheduler.step

    def spying_step(model_output, timestep, sample, *args, **kwargs):
        dtypes.append(sample.dtype)
        return step(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = spying_step
    x = denoise(lambda x_in, t: x_in.float(), torch.randn(1, 3, 4, 4).half(), scheduler, lambda out, i, n: out * 0.5)
    assert x.dtype == torch.float16 and dtypes == [torch.float32] * 4


def test_each_image_has_its_own_noise_whatever_the_batch():
    """Initial noise and a stochastic scheduler's noise come from per-image generators."""
    noise, generators = initial_noise([7, 3], (3, 4, 4))
    alone, _ = initial_noise([3], (3, 4, 4))
    assert torch.equal(noise[1:], alone) and not torch.equal(noise[0], noise[1])

    def run(seeds):
        noise, generators = initial_noise(seeds, (3, 4, 4))
        scheduler = _scheduler(EulerAncestralDiscreteScheduler)
        return denoise(lambda x_in, t: x_in, noise * scheduler.init_noise_sigma, scheduler, lambda out, i, n: out * 0,
                       generators=generators)

    together = run([7, 3])
    assert torch.equal(together[1:], run([3]))
    assert torch.equal(together, run([7, 3]))
    assert not torch.allclose(together[1], run([4])[0])  # the scheduler's noise really comes from the seed


@pytest.mark.parametrize("every, steps, calls", [(10, 6, 6), (2, 6, 4), (1, 6, 3)])
def test_non_finite_check_names_the_first_bad_step_and_reads_the_flag_every_few_steps(every, steps, calls):
    scheduler = _scheduler(steps=steps)
    made = []

    def model(x_in, t):
        made.append(1)
        out = x_in.clone()
        if len(made) == 3:
            out[1] = float("nan")  # image 1 goes bad at step 3
        return out

    check = NonFiniteCheck(["mode 'cfg' for seed 0", "mode 'pr' for seed 9"], every=every)
    with pytest.raises(NonFiniteError, match=rf"non-finite \(NaN or inf\) at step 3/{steps} \(timestep "
                                             rf"{float(scheduler.timesteps[2]):g}\) in mode 'pr' for seed 9; "):
        denoise(model, torch.randn(2, 3, 4, 4), scheduler, lambda out, i, n: out, callbacks=[check])
    assert len(made) == calls


def test_non_finite_advice_suggests_float32_only_below_float32():
    scheduler = _scheduler(steps=2)

    def bad(x_in, t):
        return torch.full_like(x_in, float("nan"))

    for dtype, advice in ((torch.float16, r"sample in float32 \(--dtype float32\)"), (torch.float32, "check the adapter")):
        with pytest.raises(NonFiniteError, match=advice):
            denoise(bad, torch.randn(1, 3, 4, 4), scheduler, lambda out, i, n: out,
                    callbacks=[NonFiniteCheck(["mode 'pr' for seed 0"], dtype=dtype)])


def test_non_finite_rows_are_caught_even_when_the_update_hides_them():
    """A clipping DDIM turns an infinite prediction into a finite sample; checking the rows still names it."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    scheduler.set_timesteps(3)

    def model(x_in, t):
        rows = torch.cat([x_in, x_in])  # rows of images [0, 1, 0, 1]
        rows[3] = float("inf")
        return rows

    def combine(output, i, n):
        return output[:2].clamp(-1, 1)  # the guided prediction ignores the bad row

    x = denoise(model, torch.randn(2, 3, 4, 4), scheduler, combine, callbacks=[NonFiniteCheck(["a", "b"])])
    assert torch.isfinite(x).all()
    with pytest.raises(NonFiniteError, match=r"at step 1/3 .* in b;"):
        denoise(model, torch.randn(2, 3, 4, 4), scheduler, combine,
                callbacks=[NonFiniteCheck(["a", "b"], every=1, row_images=[0, 1, 0, 1])])


def test_one_diffusion_scheduler_step_call_site_in_the_library():
    """Every sampler of the project runs ``denoise`` (learning-rate schedulers' ``step()`` aside)."""
    import re
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "src" / "dreamguide"
    sites = [f"{path.relative_to(source)}:{n}" for path in sorted(source.rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\.step\((?!\))", line) and "optimizer" not in line]
    assert len(sites) == 1 and sites[0].startswith("denoise.py:"), sites
