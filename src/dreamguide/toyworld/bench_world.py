"""The miniature world as an evaluation suite (``dreamguide.evaluation.protocol.World``).

Cases: every subject x adapter kind x prompt of the chosen prompt sets (templates with ``{}`` for
"<token> <class>", :mod:`~dreamguide.toyworld.prompts`). The adapter kind ``"base"`` is the base
model alone: its prompts are whole prompts without a subject (``{}``-free, e.g. random captions of
the world's grammar), sampled with classifier-free guidance, each from its own noise (seed + prompt
index), so many random prompts with one seed each make a sample of the model's prompt fidelity.

Images: each (subject, kind) adapter is read from ``adapters_dir/<token>-<kind>/`` (what
:func:`~dreamguide.toyworld.personalize.personalize` writes) and sampled with
:class:`dreamguide.sampling.Sampler`, one call per group (a prompt at one setting: its modes x
seeds); a world of base-model prompts only batches them across prompts. A ``generate`` callable
replaces this. An adapter whose files hold NaN or inf (checked by ``prepare``), or whose samples
become non-finite, is skipped by the runner; the other adapters are run and reported.

Metrics, from :class:`~dreamguide.toyworld.evaluators.ToyEvaluators` (text metrics read the base prompt):

    identity         identity (this world's DINO): mean cosine to the subject's reference photos
    text_alignment   text (this world's CLIP): image-text cosine to the base prompt
    carries_prompt   text: 1 if the image carries the base prompt's class, scene and style, else 0
    follows_style    text: 1 if its style is the prompt's (a photo when the prompt names none)
    carries_class    text: 1 if its class is the prompt's
    carries_scene    text: 1 if its scene is the prompt's (any scene when the prompt names none)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from dreamguide.evaluation.protocol import Generated, Job, PromptCase, UnusableAdapter
from dreamguide.prompts import format_prompt
from dreamguide.toyworld.prompts import PROMPT_SETS
from dreamguide.toyworld.subjects import get_subject, reference_images
from dreamguide.toyworld.world import SUBJECTS

#: The adapter kind that means "the base model, no subject".
BASE_MODEL = "base"
METRIC_KINDS = {"identity": "identity", "text_alignment": "text", "carries_prompt": "text",
                "follows_style": "text", "carries_class": "text", "carries_scene": "text"}


class ToyBenchWorld:
    """Evaluation world over the miniature world's subjects, adapters and prompt sets."""

    name = "toyworld"

    def __init__(
        self,
        generate: Callable[[Sequence[Job]], list] | None = None,
        *,
        subjects: Sequence[str] | None = None,
        adapters: Sequence[str] = ("dco",),
        prompt_sets: Sequence[str] | Mapping[str, Sequence[str]] = ("normal", "stylized"),
        prompts_per_set: int = 0,
        steps: int | None = None,
        adapters_dir: str | Path | None = None,
        device: str | None = None,
        evaluators=None,
        description: dict | None = None,
        trace: bool = True,
        groups_per_call: int = 0,
        batch_size: int = 0,
    ):
        self._generate = generate
        self.subjects = [get_subject(s).token for s in (subjects or [s.token for s in SUBJECTS])]
        self.adapters = tuple(adapters)
        #: Groups per ``generate`` call (0: the default): a base-model world samples its prompts in
        #: batches of 256; adapter groups go one per call by default (a time budget and a kill lose at
        #: most one group), or ``groups_per_call`` at a time, packed into batched sampler calls of up to
        #: ``batch_size`` images (0: 4 on a CPU, 256 on a GPU).
        self.groups_per_call = groups_per_call or (256 if set(self.adapters) == {BASE_MODEL} else 1)
        self.batch_size = int(batch_size)
        #: Record the Consistency_p trace of every image (the timestep figures read it).
        self.trace = bool(trace)
        if not isinstance(prompt_sets, Mapping):
            unknown = [name for name in prompt_sets if name not in PROMPT_SETS]
            if unknown:
                raise ValueError(f"unknown toy prompt set {unknown[0]!r}; choose from {sorted(PROMPT_SETS)}")
            prompt_sets = {name: PROMPT_SETS[name] for name in prompt_sets}
        self.prompt_sets = {name: tuple(templates) for name, templates in prompt_sets.items()}
        for name, templates in self.prompt_sets.items():
            subjectless = [t for t in templates if "{}" not in t]
            if subjectless and set(self.adapters) - {BASE_MODEL}:
                raise ValueError(f"prompt set {name!r} has prompts without '{{}}' (e.g. {subjectless[0]!r}): a "
                                 f"subject's adapter needs '{{}}' where '<token> <class>' goes")
            if len(subjectless) != len(templates) and BASE_MODEL in self.adapters:
                raise ValueError(f"prompt set {name!r} has templates with '{{}}': the base model ({BASE_MODEL!r}) "
                                 f"takes whole prompts")
        self.prompts_per_set = int(prompts_per_set)
        self.steps = steps
        self.adapters_dir = None if adapters_dir is None else Path(adapters_dir)
        self.device = device
        self._evaluators = evaluators
        self._description = dict(description or {})
        self._references: dict[str, torch.Tensor] = {}
        self._samplers: dict[tuple[str, str], tuple[object, str]] = {}
        self._base_model = None
        self._unusable: list[UnusableAdapter] = []

    @property
    def evaluators(self):
        if self._evaluators is None:
            from dreamguide.toyworld.evaluators import ToyEvaluators

            self._evaluators = ToyEvaluators.load()
        return self._evaluators

    def prepare(self) -> None:
        """Load the evaluators; every adapter folder must exist, and one whose files hold NaN or inf is
        listed by :meth:`unusable_adapters` (the runner skips it)."""
        from dreamguide.filenames import EMBEDDINGS_FILE, LORA_FILE
        from dreamguide.lora_files import NonFiniteWeights, check_finite_file

        self.evaluators  # noqa: B018 - load the weights now: fail before any generation
        self._unusable = []
        if self._generate is not None or self.steps is None:  # steps None: a world that only scores
            return
        for subject in self.subjects:
            for kind in self.adapters:
                if kind != BASE_MODEL:
                    folder = self._adapter_folder(subject, kind)
                    try:
                        check_finite_file(folder / LORA_FILE, "LoRA")
                        if (folder / EMBEDDINGS_FILE).is_file():
                            check_finite_file(folder / EMBEDDINGS_FILE, "embeddings")
                    except NonFiniteWeights as error:
                        self._unusable.append(UnusableAdapter(subject, kind, str(error)))

    def unusable_adapters(self) -> list[UnusableAdapter]:
        """The (subject, kind) adapters whose files hold NaN or infinite values (found by :meth:`prepare`)."""
        return list(self._unusable)

    def _adapter_folder(self, subject: str, kind: str) -> Path:
        from dreamguide.filenames import LORA_FILE

        if self.adapters_dir is None:
            raise ValueError(f"ToyBenchWorld needs adapters_dir to sample with the {kind!r} adapters")
        folder = self.adapters_dir / f"{subject}-{kind}"
        if not (folder / LORA_FILE).is_file():
            raise FileNotFoundError(f"no {kind} adapter for {subject!r} in {folder} ({LORA_FILE} missing); "
                                    f"train it with `dreamguide toyworld personalize --subject {subject} "
                                    f"--method {kind} --out {folder}`")
        return folder

    def _templates(self, name: str) -> tuple[str, ...]:
        templates = self.prompt_sets[name]
        return templates[: self.prompts_per_set] if self.prompts_per_set else templates

    def cases(self) -> list[PromptCase]:
        from dreamguide.toyworld.personalize import subject_token

        out = []
        if BASE_MODEL in self.adapters:
            for set_name in self.prompt_sets:
                for index, prompt in enumerate(self._templates(set_name)):
                    out.append(PromptCase("", "", set_name, index, prompt, prompt, BASE_MODEL, prompt))
        for token in self.subjects:
            subject = get_subject(token)
            for kind in self.adapters:
                if kind == BASE_MODEL:
                    continue
                identifier = subject_token(token, kind)
                for set_name in self.prompt_sets:
                    for index, template in enumerate(self._templates(set_name)):
                        token_prompt, base = format_prompt(template, identifier, subject.cls)
                        out.append(PromptCase(token, subject.cls, set_name, index, token_prompt, base, kind, template))
        return out

    def metric_backbones(self) -> dict[str, str]:
        return {"identity": "toyworld identity encoder (weights/evaluators/identity.safetensors)",
                "text_alignment": "toyworld image-text model (weights/evaluators/text_alignment.safetensors)",
                **{m: "toyworld attribute classifier (weights/evaluators/attributes.safetensors)"
                   for m in ("carries_prompt", "follows_style", "carries_class", "carries_scene")}}

    def metric_kinds(self) -> dict[str, str]:
        return dict(METRIC_KINDS)

    # -- generation --------------------------------------------------------------------------

    def generate(self, jobs: Sequence[Job]) -> list[Generated]:
        if self._generate is not None:
            return self._generate(jobs)
        if self.steps is None:
            raise ValueError("ToyBenchWorld was built without steps (to score only); pass steps to generate images")
        out: dict[str, Generated] = {}
        base = [job for job in jobs if job.case.adapter == BASE_MODEL]
        if base:
            out.update(self._generate_base(base))
        by_adapter: dict[tuple[str, str], list[Job]] = {}
        for job in jobs:
            if job.case.adapter != BASE_MODEL:
                by_adapter.setdefault((job.case.subject, job.case.adapter), []).append(job)
        for (subject, kind), adapter_jobs in by_adapter.items():
            out.update(self._generate_adapter_jobs(subject, kind, adapter_jobs))
        return [out[job.key] for job in jobs]

    def _device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def _sampler(self, subject: str, kind: str):
        from dreamguide.lora_files import ADAPTER_NAME
        from dreamguide.sampling import Sampler
        from dreamguide.toyworld.model import load_toyworld_model
        from dreamguide.toyworld.personalize import load_personalized

        if (subject, kind) not in self._samplers:
            folder = self._adapter_folder(subject, kind)
            model, token = load_personalized(subject, kind, folder=folder,
                                             model=load_toyworld_model(device=self._device()), device=self._device())
            self._samplers[(subject, kind)] = (Sampler(model, adapter_name=ADAPTER_NAME), token)
        return self._samplers[(subject, kind)]

    def _generate_adapter_jobs(self, subject: str, kind: str, jobs: Sequence[Job]) -> dict[str, Generated]:
        """Images of one subject's adapter, every job an item of one batched sampler call.

        A non-finite sample (or NaN adapter files) is an :class:`UnusableAdapter` naming the adapter's folder.
        """
        from dreamguide.denoise import NonFiniteError
        from dreamguide.lora_files import NonFiniteWeights

        try:
            return self._sample_adapter_jobs(subject, kind, jobs)
        except (NonFiniteError, NonFiniteWeights) as error:
            raise UnusableAdapter(subject, kind, f"{error} (adapter {self._adapter_folder(subject, kind)})") from error

    def _sample_adapter_jobs(self, subject: str, kind: str, jobs: Sequence[Job]) -> dict[str, Generated]:
        from dreamguide.sampling import SampleItem

        sampler, token = self._sampler(subject, kind)
        items = []
        for job in jobs:
            case, setting, variant = job.case, job.setting, job.setting.variant
            switches = {} if variant is None else {"pr": variant.pr, "shaping": variant.shaping,
                                                   "personalized_steps": variant.personalized_steps}
            items.append(SampleItem(
                prompt=case.token_prompt, base_prompt=case.base_prompt, mode=setting.mode, seed=job.seed,
                w_text=setting.w_text, token=token, class_word=case.class_word, **switches,
                **({} if setting.w_cons is None else {"w_cons": setting.w_cons}),
            ))
        clipped = {True if job.setting.variant is None else job.setting.variant.clipped_model_output for job in jobs}
        if len(clipped) > 1:
            raise ValueError("one generate call mixes DDIM updates (clipped_model_output); give them separate plans")
        batch_size = self.batch_size or (256 if self._device().startswith("cuda") else 4)
        results = sampler.sample_items(items, steps=self.steps, batch_size=batch_size, trace=self.trace,
                                       progress=False, clipped_model_output=clipped.pop())
        return {job.key: Generated(r.image, r.trace or None, r.metadata) for job, r in zip(jobs, results)}

    def _generate_base(self, jobs: Sequence[Job]) -> dict[str, Generated]:
        """Base-model images, batched over prompts that share (w_text, variant); prompt i of a set from seed + i."""
        from dreamguide.toyworld.model import load_toyworld_model, sample_cfg
        from dreamguide.toyworld.render import to_pil

        if self._base_model is None:
            self._base_model = load_toyworld_model(device=self._device())
        batches: dict[tuple, list[Job]] = {}
        for job in jobs:
            if job.setting.mode != "cfg":
                raise ValueError(f"the base model ({BASE_MODEL!r}) samples in mode 'cfg' only, not {job.setting.mode!r}")
            batches.setdefault((job.setting.w_text, job.setting.variant), []).append(job)
        out = {}
        for (w_text, variant), batch in batches.items():
            clipped = True if variant is None else variant.clipped_model_output
            seeds = [job.seed + job.case.prompt_index for job in batch]
            images = sample_cfg(self._base_model, [job.case.token_prompt for job in batch], seeds, steps=self.steps,
                                w_text=w_text, clipped_model_output=clipped)
            for job, image, seed in zip(batch, to_pil(images), seeds):
                out[job.key] = Generated(image, None, {"prompt": job.case.token_prompt, "mode": "cfg",
                                                       "w_text": w_text, "noise_seed": seed, "steps": self.steps,
                                                       "clipped_model_output": clipped})
        return out

    # -- scoring -----------------------------------------------------------------------------

    def references(self, subject: str) -> torch.Tensor:
        if subject not in self._references:
            self._references[subject] = reference_images(subject)
        return self._references[subject]

    def score(self, jobs, images) -> list[dict[str, float | None]]:
        """Scores per image; ``images`` are PIL images or a ``(N, 3, 32, 32)`` tensor in [-1, 1].

        All images are scored in one batch (the identity metric in one batch per subject).
        """
        from dreamguide.toyworld.render import from_pil

        if len(jobs) != len(images):
            raise ValueError(f"score got {len(jobs)} jobs but {len(images)} images")
        if not len(jobs):
            return []
        tensor = images if isinstance(images, torch.Tensor) else from_pil(images)
        prompts = [job.case.base_prompt for job in jobs]
        by_subject: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            if job.case.subject:
                by_subject.setdefault(job.case.subject, []).append(i)
        identity: list[float | None] = [None] * len(jobs)
        for subject, rows in by_subject.items():
            for i, value in zip(rows, self.evaluators.identity(tensor[rows], self.references(subject)).tolist()):
                identity[i] = value
        text = self.evaluators.text_alignment(tensor, prompts).tolist()
        judged = self.evaluators.judge(tensor, prompts)
        columns = {"carries_prompt": judged.all, "follows_style": judged.style, "carries_class": judged.cls,
                   "carries_scene": judged.scene}
        columns = {name: values.float().tolist() for name, values in columns.items()}
        return [{"identity": identity[i], "text_alignment": text[i], **{k: v[i] for k, v in columns.items()}}
                for i in range(len(jobs))]

    def describe(self) -> dict:
        return {"world": self.name, "subjects": list(self.subjects), "adapters": list(self.adapters),
                "prompt_sets": {k: list(v) for k, v in self.prompt_sets.items()},
                "prompts_per_set": self.prompts_per_set, "steps": self.steps,
                "metrics": self.metric_backbones(), **self._description}
