"""Toy-world experiments as configs: prompt sets, sampler variants and plans (the PR paper's by default).

An experiment (:class:`ToyExperiment`, read from TOML with :mod:`dreamguide.config` by
:func:`load_toy_experiment`) names its subjects, seeds and steps, the fine-tuning settings of its
adapters, named prompt sets (templates, a set of :data:`~dreamguide.toyworld.prompts.PROMPT_SETS`,
or random prompts of the world's grammar), named sampler variants (PR switches, the DDIM update)
and a few *plans*. A plan is a :class:`~dreamguide.toyworld.bench_world.ToyBenchWorld` (adapter
kinds x prompt sets, :meth:`ToyExperiment.world`) and a :class:`~dreamguide.evaluation.protocol.Plan`
(modes x w_text x w_cons x variants x seeds, :meth:`ToyExperiment.plan`).
:mod:`~dreamguide.toyworld.reproduce` runs and reports them. The defaults are the PR paper's
experiments, spelled out in ``configs/toyworld-reproduce.toml``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from dreamguide.evaluation.protocol import Plan, Variant
from dreamguide.guidance import W_CONS, W_TEXT, ParallelRescaling
from dreamguide.toyworld.bench_world import BASE_MODEL
from dreamguide.toyworld.personalize import PersonalizeSettings

#: Today's reproduction: normal prompts are these six (backgrounds the references never show, a
#: recolouring, an edit), not the 20 of ``prompts.PROMPT_SETS["normal"]``.
_REPRODUCE_NORMAL = ("a {} in the snow", "a {} in the jungle", "a {} under a night sky",
                     "a {} with a city in the background", "a red {}", "a shiny {}")
EXPERIMENT_FILE = "experiment.json"
_JUDGED = ("carries_class", "carries_scene", "follows_style", "carries_prompt")


@dataclass(frozen=True)
class PromptSetConfig:
    """A named prompt list: ``templates`` ({} = "<token> <class>"), a set of ``toyworld.prompts.PROMPT_SETS``
    (no templates given: the set of this name), or ``count`` random prompts of the world's grammar."""

    name: str
    templates: tuple[str, ...] = ()
    random: Literal["", "normal", "stylized"] = ""
    count: int = 0
    seed: int = 0

    def prompts(self) -> tuple[str, ...]:
        from dreamguide.toyworld.prompts import PROMPT_SETS

        if self.random:
            normal, stylized = base_prompts(self.count, self.seed)
            return tuple(normal if self.random == "normal" else stylized)
        if self.templates:
            return self.templates
        if self.name not in PROMPT_SETS:
            raise ValueError(f"prompt set {self.name!r} has no templates and is not one of {sorted(PROMPT_SETS)}")
        return PROMPT_SETS[self.name]


@dataclass(frozen=True)
class PlanConfig:
    """One plan: adapter kinds ("base": the base model alone) x prompt sets x modes x weights x variants."""

    name: str
    adapters: tuple[str, ...] = ("dreambooth-ti", "dco")
    prompt_sets: tuple[str, ...] = ("normal", "stylized")
    prompts_per_set: int = 0  # 0 = all; n = the first n of each set
    modes: tuple[str, ...] = ("dreambooth", "consistency", "parallel-rescaled", "orthogonal")
    w_text: tuple[float, ...] = (W_TEXT,)
    w_cons: tuple[float, ...] = (W_CONS,)
    variants: tuple[str, ...] = ()  # names of [[variants]]
    seeds: tuple[int, ...] | None = None  # None: the experiment's seeds
    title: str = ""
    metrics: tuple[str, ...] = ()  # the report's columns (empty: the report's metrics)
    reference: str = ""  # another plan, summarized beside this one on the same units


@dataclass(frozen=True)
class ExperimentReport:
    baseline_mode: str = "consistency"
    compare: tuple[str, ...] = ("parallel-rescaled",)  # paired differences: each of these minus the baseline
    metrics: tuple[str, ...] = ("text_alignment", "identity", "carries_prompt", "follows_style")
    bootstrap_samples: int = 2000
    bootstrap_seed: int = 0
    confidence: float = 0.95
    digits: int = 3
    pareto_plans: tuple[str, ...] = ("main", "sweep-low", "sweep-paper")
    pareto_prompt_set: str = "stylized"
    trace_plans: tuple[str, ...] = ("main",)
    trace_modes: tuple[str, ...] = ("consistency", "parallel-rescaled")


def _pr(granularity: str, normalization: str, rescale: float) -> ParallelRescaling:
    return ParallelRescaling(granularity=granularity, normalization=normalization, rescale=rescale)


@dataclass(frozen=True)
class ToyExperiment:
    """An experiment in the miniature world; the defaults are the PR paper's (docs/RESULTS.md)."""

    subjects: tuple[str, ...] = ()  # () = all six
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    steps: int = 20
    personalize: PersonalizeSettings = field(default_factory=PersonalizeSettings)
    prompt_sets: tuple[PromptSetConfig, ...] = (
        PromptSetConfig("normal", _REPRODUCE_NORMAL),
        PromptSetConfig("stylized"),
        PromptSetConfig("random-normal", random="normal", count=256),
        PromptSetConfig("random-stylized", random="stylized", count=256),
    )
    variants: tuple[Variant, ...] = (
        Variant("clip-negative", _pr("location", "clip-negative", 1.0)),
        Variant("sample-clip-negative", _pr("sample", "clip-negative", 1.0)),
        Variant("sample-zero", _pr("sample", "zero", 1.0)),
        Variant("standardize-x0.5", _pr("location", "standardize", 0.5)),
        Variant("standardize-x2", _pr("location", "standardize", 2.0)),
        Variant("unclipped", clipped_model_output=False),
    )
    plans: tuple[PlanConfig, ...] = (
        PlanConfig("base", (BASE_MODEL,), ("random-normal", "random-stylized"), modes=("cfg",),
                   w_text=(1.5, 2.0, 3.0, 5.0, 7.5, 10.0), seeds=(0,), metrics=_JUDGED,
                   title="Base model: prompt fidelity (attribute classifiers)"),
        PlanConfig("base-unclipped", (BASE_MODEL,), ("random-normal", "random-stylized"), modes=("cfg",),
                   w_text=(2.0, 5.0, 7.5), variants=("unclipped",), seeds=(0,), metrics=_JUDGED,
                   title="Base model with diffusers' default DDIM update"),
        PlanConfig("main", title="Main comparison"),
        PlanConfig("sweep-low", ("dco",), ("stylized",), 4, ("consistency", "parallel-rescaled"), (1.5, 2.0, 3.0),
                   (0.5, 1.0, 2.0), title="Weight sweep at low weights (dco adapters, stylized prompts)"),
        PlanConfig("sweep-paper", ("dco",), ("stylized",), 4, ("consistency", "parallel-rescaled"), (5.0, 7.5, 10.0),
                   (1.5, 3.0, 4.5), title="Weight sweep on the paper's grid (dco adapters, stylized prompts)"),
        PlanConfig("variants", ("dco",), ("stylized",), 4, ("parallel-rescaled",),
                   variants=("clip-negative", "sample-clip-negative", "sample-zero", "standardize-x0.5",
                             "standardize-x2"), reference="main",
                   title="PR variants (dco adapters, stylized prompts)"),
    )
    report: ExperimentReport = field(default_factory=ExperimentReport)
    #: Record every image's Consistency_p trace (the timestep figure reads them).
    trace: bool = True
    #: Batched sampling: images per sampler call (0: the world's default), groups per generate call.
    batch_size: int = 0
    groups_per_call: int = 0

    def validate(self, source: str) -> "ToyExperiment":
        from dreamguide.config import ConfigError
        from dreamguide.toyworld.personalize import METHODS
        from dreamguide.toyworld.subjects import get_subject

        def fail(message: str):
            raise ConfigError(f"{source}: {message}")

        for name, items in (("prompt_sets", self.prompt_sets), ("variants", self.variants), ("plans", self.plans)):
            names = [item.name for item in items]
            if len(set(names)) != len(names):
                fail(f"{name} has two entries named {next(n for n in names if names.count(n) > 1)!r}")
        sets = {s.name: s for s in self.prompt_sets}
        variants = {v.name for v in self.variants}
        plans = {p.name for p in self.plans}
        if not self.plans:
            fail("no [[plans]]: an experiment needs at least one")
        try:
            for subject in self.subjects:
                get_subject(subject)
            for s in self.prompt_sets:
                if s.random and s.count < 1:
                    fail(f"prompt set {s.name!r}: random prompts need count >= 1")
                s.prompts()
            for p in self.plans:
                for kind in p.adapters:
                    if kind != BASE_MODEL and kind not in METHODS:
                        fail(f"plan {p.name!r}: adapter {kind!r}: choose from {BASE_MODEL}, {', '.join(METHODS)}")
                for kind, names, known in (("prompt set", p.prompt_sets, sets), ("variant", p.variants, variants),
                                           ("reference plan", [p.reference] if p.reference else [], plans)):
                    unknown = [n for n in names if n not in known]
                    if unknown:
                        fail(f"plan {p.name!r}: unknown {kind} {unknown[0]!r}; defined: {', '.join(known) or 'none'}")
                self.plan(p)
                self.world(p, steps=None)
        except ValueError as error:
            if isinstance(error, ConfigError):
                raise
            fail(str(error))
        for name in (*self.report.pareto_plans, *self.report.trace_plans):
            if name not in plans:
                fail(f"report names plan {name!r}, which the experiment does not define")
        return self

    def plan(self, plan: PlanConfig) -> Plan:
        variants = {v.name: v for v in self.variants}
        return Plan(modes=plan.modes, w_text=plan.w_text, w_cons=plan.w_cons, seeds=plan.seeds or self.seeds,
                    variants=tuple(variants[name] for name in plan.variants))

    def world(self, plan: PlanConfig, steps: int | None, adapters_dir=None, device=None, evaluators=None):
        from dreamguide.toyworld.bench_world import ToyBenchWorld

        sets = {s.name: s.prompts() for s in self.prompt_sets}
        return ToyBenchWorld(subjects=self.subjects or None, adapters=plan.adapters,
                             prompt_sets={name: sets[name] for name in plan.prompt_sets},
                             prompts_per_set=plan.prompts_per_set, steps=steps, adapters_dir=adapters_dir,
                             device=device, evaluators=evaluators, description={"plan": plan.name},
                             trace=self.trace, batch_size=self.batch_size, groups_per_call=self.groups_per_call)

    def chosen(self, names: Sequence[str] | None) -> list[PlanConfig]:
        if not names:
            return list(self.plans)
        known = {p.name: p for p in self.plans}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown plan(s) {unknown}; the experiment defines {', '.join(known)}")
        return [known[n] for n in names]


def load_toy_experiment(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> ToyExperiment:
    """Read an experiment config (TOML, or a run's ``experiment.json``; ``None``: the defaults) and
    apply ``key=value`` overrides."""
    from dreamguide.config import apply_overrides, from_dict, read_toml

    source = "the default experiment" if path is None else str(path)
    if path is None:
        data = {}
    elif Path(path).suffix == ".json":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    else:
        data = read_toml(path)
    if overrides:
        source += " (with --set overrides)"
    return from_dict(ToyExperiment, apply_overrides(ToyExperiment, data, overrides), source).validate(source)


def stored_experiment(out) -> ToyExperiment | None:
    """The experiment a folder was generated with (its ``experiment.json``), or None."""
    path = Path(out) / EXPERIMENT_FILE
    return load_toy_experiment(path) if path.is_file() else None


def base_prompts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` random normal prompts (photo, said or unsaid) and ``n`` stylized ones, from the grammar."""
    import torch

    from dreamguide.toyworld.subjects import sample_base_labels
    from dreamguide.toyworld.world import caption

    generator = torch.Generator().manual_seed(seed)
    labels = sample_base_labels(2 * n, generator)
    normal = [caption(dataclasses.replace(lab, style="photo"), style=i % 2 == 0, material=False, pattern=i % 3 == 0)
              for i, lab in enumerate(labels[:n])]
    stylized = [caption(lab if lab.style != "photo" else dataclasses.replace(lab, style="sketch"), material=False,
                        pattern=False) for lab in labels[n:]]
    return normal, stylized
