"""Consistency and parallel-rescaled guidance as a diffusers guider (SPEC sections 1-3).

``ConsistencyGuidance`` is a ``diffusers.guiders.BaseGuidance`` for diffusers' modular SDXL
pipeline. Each step it asks for three predictions and combines them with
``dreamguide.guidance.guide``, so the arithmetic is the project's own:

    pred_uncond        adapter off   negative prompt (the pipeline's ``negative_prompt``)
    pred_base          adapter off   base prompt     (the pipeline's ``prompt``)
    pred_personalized  adapter on    token prompt    (given to the guider: ``set_token_prompt``)

    import torch
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
    from dreamguide.integrations.diffusers import ConsistencyGuidance

    pipe = StableDiffusionXLAutoBlocks().init_pipeline("stabilityai/stable-diffusion-xl-base-1.0")
    pipe.load_components(torch_dtype=torch.float16)
    pipe.to("cuda")
    pipe.load_lora_weights("run/pytorch_lora_weights.safetensors", adapter_name="subject")
    guider = ConsistencyGuidance(mode="parallel-rescaled", w_text=7.5, w_cons=3.0, adapter_name="subject")
    guider.set_token_prompt(pipe, "a watercolor painting of <sks> dog")
    pipe.update_components(guider=guider)
    image = pipe(prompt="a watercolor painting of dog", num_inference_steps=50, output="images")[0]

Why the token prompt lives in the guider: in diffusers 0.42 the SDXL denoise step
(``StableDiffusionXLLoopDenoiser``) hands a guider fixed (conditional, unconditional) pairs of
``prompt_embeds``, ``text_embeds`` (pooled), ``time_ids`` and ``image_embeds``, built from the
pipeline's ``prompt`` and ``negative_prompt`` only; a guider can choose which of the two each
batch uses but there is no third prompt to choose. So the guider keeps the encoded token
prompt itself and puts it into the personalized batch (``time_ids`` and ``image_embeds`` come
from the conditional side). The pipeline is used unmodified.

Adapters: ``prepare_models`` routes every LoRA layer of the UNet with PEFT's per-row
``adapter_names`` (``dreamguide.unet_rows``): the named adapter on for the personalized batch,
off (``unet_rows.BASE_ROUTE``) for the other two, and ``cleanup_models`` removes the hooks, so the UNet's
own adapter state is never changed. ``adapter_name=None`` is for personalization by learned
tokens alone: then the UNet must carry no LoRA adapter.

Outside ``[start, stop)`` (fractions of the steps, as diffusers' guiders count them) the guider
asks for the personalized prediction alone and steps with it; ``stop=0.0`` does so at every
step. (``enabled=False`` does not work in the SDXL pipeline: its denoise loop calls
``guider.enable()`` after the text encoder step has left out the negative prompt.)

Against ``dreamguide.sampling.Sampler`` with the same seeds: in float32 the images are the
same (the test suite asserts a uint8 difference of 0 on a tiny SDXL model, for consistency and
parallel-rescaled guidance). What can still differ in other settings: the Sampler computes the
three predictions in one batched forward, the pipeline in three; the Sampler keeps latents in
float32 whatever the model dtype, the pipeline in the model dtype (float16 sampling rounds
differently); the Sampler stops on a non-finite step every few steps, the guider at once.

diffusers marks guiders and modular pipelines as experimental: this module relies on the
``BaseGuidance`` interface (``_input_predictions``, ``_prepare_batch``, ``prepare_inputs`` taking
(conditional, unconditional) pairs, ``prepare_models``/``cleanup_models`` around each batch's
forward) and on ``StableDiffusionXLTextEncoderStep.encode_prompt`` as they are in diffusers 0.42,
and refuses to import with other versions (``SUPPORTED_DIFFUSERS``).
"""

from __future__ import annotations

import math
import re
from contextlib import ExitStack
from importlib.metadata import version as installed_version

#: The diffusers versions this module is written and tested against: [lower, upper).
SUPPORTED_DIFFUSERS: tuple[tuple[int, int], tuple[int, int]] = ((0, 42), (0, 43))


def check_diffusers_version(found: str) -> None:
    """Raise ImportError, saying what to install, unless ``found`` is in ``SUPPORTED_DIFFUSERS``."""
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_DIFFUSERS
    wanted = f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"
    match = re.match(r"(\d+)\.(\d+)", found)
    if match is None or not (lo_major, lo_minor) <= (int(match[1]), int(match[2])) < (hi_major, hi_minor):
        raise ImportError(
            f"dreamguide.integrations.diffusers needs diffusers{wanted}, found {found}: diffusers' guiders "
            f"are experimental and their interface changes between releases; install "
            f"'diffusers{wanted}', or sample with dreamguide's own Sampler (dreamguide sample)"
        )


check_diffusers_version(installed_version("diffusers"))

import torch  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput  # noqa: E402

from dreamguide import guidance, unet_rows  # noqa: E402
from dreamguide.lora_files import ADAPTER_NAME  # noqa: E402

#: The 3-prediction guidance modes this guider runs (aliases such as "pr" are accepted too).
GUIDER_MODES: tuple[str, ...] = tuple(
    name for name, mode in guidance.MODES.items() if mode.needs == ("uncond", "base", "personalized")
)

#: Keys of the SDXL denoise step's guider inputs that the personalized batch replaces.
_TOKEN_KEYS = ("prompt_embeds", "text_embeds")


class ConsistencyGuidance(BaseGuidance):
    """Consistency guidance (DCO) and its parallel-rescaled and orthogonal variants, as a diffusers guider.

    Args:
        mode: ``"parallel-rescaled"`` (alias ``"pr"``), ``"consistency"`` or ``"orthogonal"``.
        w_text: text guidance weight (g_text = e_c - e_u).
        w_cons: consistency guidance weight (g_cons = e_ft - e_c).
        pr: the parallel-rescaling switches, a dict of ``dreamguide.guidance.ParallelRescaling``
            fields (or one), stored in the config as a dict.
        adapter_name: the LoRA adapter of the personalized model, or None (learned tokens only).
        start, stop, enabled: diffusers' guider window and switch (see the module docstring).

    The token prompt is state, not config: set it with ``set_token_prompt`` (or
    ``set_token_prompt_embeds``) before running the pipeline; ``new()`` does not copy it.
    """

    _input_predictions = ["pred_uncond", "pred_base", "pred_personalized"]

    @register_to_config
    def __init__(
        self,
        mode: str = "parallel-rescaled",
        w_text: float = guidance.W_TEXT,
        w_cons: float = guidance.W_CONS,
        pr: dict | None = None,
        adapter_name: str | None = ADAPTER_NAME,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(start, stop, enabled)
        self.guidance_mode = guidance.get_mode(mode)
        if self.guidance_mode.name not in GUIDER_MODES:
            raise ValueError(
                f"ConsistencyGuidance runs the 3-prediction modes {', '.join(GUIDER_MODES)}; {mode!r} is not one "
                "(for plain cfg use diffusers' ClassifierFreeGuidance)"
            )
        if isinstance(pr, guidance.ParallelRescaling):
            self.pr = pr
        else:
            fields = set(guidance.ParallelRescaling().to_dict())
            unknown = sorted(set(pr or {}) - fields)
            if unknown:
                raise ValueError(f"unknown parallel-rescaling setting(s) {unknown} in pr; valid: {sorted(fields)}")
            self.pr = guidance.ParallelRescaling(**(pr or {}))
        for name, value in (("w_text", w_text), ("w_cons", w_cons)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        self.w_text, self.w_cons = float(w_text), float(w_cons)
        self.adapter_name = adapter_name
        self.register_to_config(mode=self.guidance_mode.name, pr=self.pr.to_dict())
        self._token_prompt_embeds: torch.Tensor | None = None
        self._token_pooled_prompt_embeds: torch.Tensor | None = None
        self._batch_names: list[str] = []
        self._rows = 0
        self._routing = ExitStack()

    # -- the token prompt -------------------------------------------------------------------

    def set_token_prompt(
        self, pipe, prompt: str | list[str], prompt_2: str | list[str] | None = None, clip_skip: int | None = None
    ) -> None:
        """Encode the token prompt ("a <sks> dog in the snow") with ``pipe``'s own text encoders.

        ``pipe`` is the modular SDXL pipeline the guider will run in; the prompt goes through the
        same ``encode_prompt`` as the pipeline's ``prompt``, so learned tokens loaded into the
        pipeline (``load_textual_inversion``) are used. One prompt serves every image; a list must
        have one token prompt per pipeline prompt.
        """
        from diffusers.modular_pipelines.stable_diffusion_xl.encoders import StableDiffusionXLTextEncoderStep

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"the token prompt must be a non-empty string (or list of them), got {prompt!r}")
        with torch.no_grad():
            embeds, _, pooled, _ = StableDiffusionXLTextEncoderStep.encode_prompt(
                pipe,
                prompts,
                prompt_2,
                device=pipe._execution_device,
                num_images_per_prompt=1,
                prepare_unconditional_embeds=False,
                clip_skip=clip_skip,
            )
        self.set_token_prompt_embeds(embeds, pooled)

    def set_token_prompt_embeds(self, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor) -> None:
        """Use already encoded token-prompt embeddings: ``[B, 77, D]`` and pooled ``[B, D2]``."""
        if prompt_embeds.ndim != 3 or pooled_prompt_embeds.ndim != 2:
            raise ValueError(
                f"token prompt embeddings must be [B, tokens, D] and pooled [B, D2]; got {tuple(prompt_embeds.shape)} "
                f"and {tuple(pooled_prompt_embeds.shape)}"
            )
        if prompt_embeds.shape[0] != pooled_prompt_embeds.shape[0]:
            raise ValueError(
                f"{prompt_embeds.shape[0]} token prompt embeddings but {pooled_prompt_embeds.shape[0]} pooled ones"
            )
        self._token_prompt_embeds = prompt_embeds
        self._token_pooled_prompt_embeds = pooled_prompt_embeds

    def _token_rows(self, like_embeds: torch.Tensor, like_pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token conditioning expanded to the pipeline's rows (prompt-major: each prompt's images together)."""
        if self._token_prompt_embeds is None:
            raise ValueError(
                "ConsistencyGuidance has no token prompt; call guider.set_token_prompt(pipe, 'a <sks> dog ...') "
                "before running the pipeline"
            )
        rows, given = like_embeds.shape[0], self._token_prompt_embeds.shape[0]
        if rows % given:
            raise ValueError(
                f"{given} token prompt(s) for {rows} pipeline rows; give one token prompt, or one per pipeline prompt"
            )
        if self._token_prompt_embeds.shape[1:] != like_embeds.shape[1:]:
            raise ValueError(
                f"the token prompt embeddings have shape {tuple(self._token_prompt_embeds.shape[1:])} per row, the "
                f"pipeline's prompt {tuple(like_embeds.shape[1:])}; encode the token prompt with the same pipeline"
            )
        embeds = self._token_prompt_embeds.to(like_embeds.device, like_embeds.dtype)
        pooled = self._token_pooled_prompt_embeds.to(like_pooled.device, like_pooled.dtype)
        return embeds.repeat_interleave(rows // given, dim=0), pooled.repeat_interleave(rows // given, dim=0)

    # -- diffusers' guider interface --------------------------------------------------------

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        """The batches (diffusers ``BlockState``s): [uncond, base, personalized], or [personalized] when off."""
        missing = [key for key in _TOKEN_KEYS if key not in data]
        if missing:
            raise ValueError(
                f"ConsistencyGuidance needs the SDXL denoise step's inputs {list(_TOKEN_KEYS)}; {missing} are not "
                f"among {sorted(data)} (it runs in diffusers' modular SDXL pipeline)"
            )
        names = list(self._input_predictions) if self._is_enabled() else ["pred_personalized"]
        batches = []
        for name in names:
            batch = self._prepare_batch(data, 1 if name == "pred_uncond" else 0, name)
            if name == "pred_personalized":
                batch.prompt_embeds, batch.text_embeds = self._token_rows(batch.prompt_embeds, batch.text_embeds)
            elif batch.prompt_embeds is None:
                raise ValueError(
                    f"the pipeline gave no {'negative' if name == 'pred_uncond' else 'base'} prompt embeddings: its "
                    "text encoder step skips the negative prompt when the guider is disabled, and its denoise loop "
                    "enables the guider again; to sample without guidance use stop=0.0 instead of enabled=False"
                )
            batches.append(batch)
        self._batch_names = names
        self._rows = batches[0].prompt_embeds.shape[0]
        return batches

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        """Route the UNet's LoRA layers for the next batch: the adapter on for the personalized one only."""
        self._count_prepared += 1
        name = self._batch_names[self._count_prepared - 1]
        if self.adapter_name is None:
            loaded = list(getattr(denoiser, "peft_config", None) or {})
            if loaded:
                raise ValueError(
                    f"the UNet carries LoRA adapter(s) {loaded} but the guider has adapter_name=None, so the base "
                    f"predictions would use them; pass adapter_name={loaded[0]!r}"
                )
            return
        route = self.adapter_name if name == "pred_personalized" else unet_rows.BASE_ROUTE
        self._routing.enter_context(unet_rows.routed_adapters(denoiser, [route] * self._rows))

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self._routing.close()

    def forward(
        self,
        pred_uncond: torch.Tensor | None = None,
        pred_base: torch.Tensor | None = None,
        pred_personalized: torch.Tensor | None = None,
    ) -> GuiderOutput:
        if not self._is_enabled():
            pred = pred_personalized
        else:
            predictions = guidance.Predictions(uncond=pred_uncond, base=pred_base, personalized=pred_personalized)
            steps = self._num_inference_steps or 1
            progress = min(self._step / max(steps - 1, 1), 1.0)
            pred = guidance.guide(self.guidance_mode, predictions, self.w_text, self.w_cons, self.pr, progress=progress)
        if not bool(torch.isfinite(pred).all()):
            raise FloatingPointError(
                f"the guided prediction became non-finite (NaN or inf) at step {self._step} in mode "
                f"{self.guidance_mode.name!r}; sample in float32 or lower the guidance weights"
            )
        return GuiderOutput(pred=pred, pred_cond=pred_base, pred_uncond=pred_uncond)

    @property
    def is_conditional(self) -> bool:
        return self._batch_names[self._count_prepared - 1] != "pred_uncond" if self._count_prepared else True

    @property
    def num_conditions(self) -> int:
        return 3 if self._is_enabled() else 1

    def _is_enabled(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)
