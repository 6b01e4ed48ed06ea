"""The miniature world as a benchmark world (``dreamguide.bench.world.World``): subjects, prompts, scorers.

Its cases are every subject x the chosen prompt sets of :mod:`~dreamguide.toyworld.prompts`; its
metrics come from :class:`~dreamguide.toyworld.evaluators.ToyEvaluators`:

    toy_identity   identity (this world's DINO): mean cosine to the subject's reference photos
    toy_text       text (this world's CLIP): image-text cosine to the base prompt
    toy_carries    text: 1 if the image carries the base prompt's class, scene and style, else 0

Image generation is not this module's business: pass ``generate``, a callable that maps the jobs of
one group to ``Generated`` images (the toy base model and its subject adapters provide one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dreamguide.prompts import format_prompt
from dreamguide.toyworld.prompts import PROMPT_SETS
from dreamguide.toyworld.subjects import get_subject, reference_images
from dreamguide.toyworld.world import SUBJECTS

METRIC_KINDS = {"toy_identity": "identity", "toy_text": "text", "toy_carries": "text"}


class ToyBenchWorld:
    """Benchmark world over the miniature world's subjects; ``generate`` supplies the images."""

    name = "toyworld"

    def __init__(
        self,
        generate: Callable[[Sequence], list] | None = None,
        *,
        subjects: Sequence[str] | None = None,
        prompt_sets: Sequence[str] = ("normal", "stylized"),
        prompts_per_set: int = 0,
        evaluators=None,
        description: dict | None = None,
    ):
        self._generate = generate
        self.subjects = [get_subject(s).token for s in (subjects or [s.token for s in SUBJECTS])]
        for name in prompt_sets:
            if name not in PROMPT_SETS:
                raise ValueError(f"unknown toy prompt set {name!r}; choose from {sorted(PROMPT_SETS)}")
        self.prompt_sets = tuple(prompt_sets)
        self.prompts_per_set = int(prompts_per_set)
        self._evaluators = evaluators
        self._description = dict(description or {})
        self._references: dict[str, torch.Tensor] = {}

    @property
    def evaluators(self):
        if self._evaluators is None:
            from dreamguide.toyworld.evaluators import ToyEvaluators

            self._evaluators = ToyEvaluators.load()
        return self._evaluators

    def prepare(self) -> None:
        self.evaluators  # noqa: B018 - load the weights now: fail before any generation
        if self._generate is None:
            raise ValueError("ToyBenchWorld needs a generate callable (jobs -> Generated images) to run a benchmark")

    def cases(self):
        from dreamguide.evaluation.protocol import PromptCase

        out = []
        for token in self.subjects:
            subject = get_subject(token)
            for set_name in self.prompt_sets:
                templates = PROMPT_SETS[set_name]
                if self.prompts_per_set:
                    templates = templates[: self.prompts_per_set]
                for index, template in enumerate(templates):
                    token_prompt, base = format_prompt(template, subject.token, subject.cls)
                    out.append(PromptCase(subject.token, subject.cls, set_name, index, token_prompt, base))
        return out

    def metric_backbones(self) -> dict[str, str]:
        return {"toy_identity": "toyworld identity encoder (weights/evaluators/identity.safetensors)",
                "toy_text": "toyworld image-text model (weights/evaluators/text_alignment.safetensors)",
                "toy_carries": "toyworld attribute classifier (weights/evaluators/attributes.safetensors)"}

    def metric_kinds(self) -> dict[str, str]:
        return dict(METRIC_KINDS)

    def generate(self, jobs):
        if self._generate is None:
            raise ValueError("ToyBenchWorld was built without a generate callable")
        return self._generate(jobs)

    def references(self, subject: str) -> torch.Tensor:
        if subject not in self._references:
            self._references[subject] = reference_images(subject)
        return self._references[subject]

    def score(self, jobs, images) -> list[dict[str, float]]:
        """Scores per image; ``images`` are PIL images or a ``(N, 3, 32, 32)`` tensor in [-1, 1]."""
        from dreamguide.toyworld.render import from_pil

        if len(jobs) != len(images):
            raise ValueError(f"score got {len(jobs)} jobs but {len(images)} images")
        tensor = images if isinstance(images, torch.Tensor) else from_pil(images)
        prompts = [job.case.base_prompt for job in jobs]
        by_subject: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            by_subject.setdefault(job.case.subject, []).append(i)
        identity = torch.empty(len(jobs))
        for subject, rows in by_subject.items():
            identity[rows] = self.evaluators.identity(tensor[rows], self.references(subject))
        text = self.evaluators.text_alignment(tensor, prompts)
        carries = self.evaluators.judge(tensor, prompts).all.float()
        return [{"toy_identity": float(i), "toy_text": float(t), "toy_carries": float(c)}
                for i, t, c in zip(identity, text, carries)]

    def describe(self) -> dict:
        return {"world": self.name, "subjects": list(self.subjects), "prompt_sets": list(self.prompt_sets),
                "prompts_per_set": self.prompts_per_set, "metrics": self.metric_backbones(), **self._description}
