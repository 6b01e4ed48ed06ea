"""``dreamguide toyworld frontier``: each guidance rule's trade-off curve against the w_cons knob.

A frontier experiment (:class:`FrontierExperiment`, a TOML config read with :mod:`dreamguide.config`)
lists *rules*: a guidance mode with fixed switches and one strength knob swept over a few values
(``w_cons``, ``w_text``, or a field of the PR or shaping switches, ``shaping.stop``...). It becomes a
:class:`~dreamguide.toyworld.experiment.ToyExperiment` of one plan per rule, generated on the shared
runner (:func:`dreamguide.toyworld.reproduce.generate`: adapters fine-tuned once, shards in worker
processes, resumable, within a time budget), and is read back as curves, one point per knob value.

:mod:`dreamguide.evaluation.frontier` compares each curve with the baseline rule's (plain
consistency guidance with w_cons swept) at matched text alignment, with paired bootstrap intervals
over (subject, adapter, prompt) units, for every (adapter kind, prompt set) slice. Outputs:
``frontier.json``, ``frontier.md`` and ``frontier.png`` in the run folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dreamguide.evaluation.protocol import Variant
from dreamguide.guidance import W_CONS, W_TEXT, ConsistencyShaping, ParallelRescaling, get_mode
from dreamguide.personalized_steps import EVERY_STEP, PersonalizedSteps
from dreamguide.toyworld.experiment import ExperimentReport, PlanConfig, PromptSetConfig, ToyExperiment
from dreamguide.toyworld.personalize import PersonalizeSettings

FRONTIER_FILE = "frontier.json"
KNOB_PREFIXES = ("shaping.", "pr.")


@dataclass(frozen=True)
class FrontierRule:
    """A guidance rule and its strength knob: ``mode`` with ``pr``/``shaping`` switches, ``knob`` swept
    over ``values`` while the other weight stays at ``w_text``/``w_cons``."""

    name: str
    mode: str = "consistency"
    knob: str = "w_cons"
    values: tuple[float, ...] = ()
    w_text: float = W_TEXT
    w_cons: float = W_CONS
    pr: ParallelRescaling = field(default_factory=ParallelRescaling)
    shaping: ConsistencyShaping = field(default_factory=ConsistencyShaping)
    #: The steps that evaluate the personalized row (the cost work: docs/SAMPLING.md).
    personalized_steps: PersonalizedSteps = EVERY_STEP
    #: Another rule to compare with point by point (same knob values, paired over units), besides the
    #: curve comparison with the baseline: e.g. the same rule with the personalized row on every step.
    reference: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "@" in self.name:
            raise ValueError(f"a rule needs a plain name (no '/' or '@'), got {self.name!r}")
        mode = get_mode(self.mode)  # an unknown mode is an error naming the valid ones
        if self.personalized_steps != EVERY_STEP and not mode.has_consistency:
            raise ValueError(f"rule {self.name!r}: personalized_steps changes only modes with a consistency term, "
                             f"and {self.mode!r} has none; drop it or use e.g. mode = \"parallel-rescaled\"")
        if len(self.values) < 2 or len(set(self.values)) != len(self.values):
            raise ValueError(f"rule {self.name!r}: values needs at least two different knob values, got "
                             f"{list(self.values)}")
        if self.knob not in ("w_cons", "w_text") and not self.knob.startswith(KNOB_PREFIXES):
            raise ValueError(f"rule {self.name!r}: knob {self.knob!r} must be w_cons, w_text, pr.<field> or "
                             f"shaping.<field>, e.g. shaping.stop")
        for value in self.values:
            self.switches(value)  # every knob value must make valid switches

    def switches(self, value: float) -> tuple[ParallelRescaling, ConsistencyShaping]:
        """The PR and shaping switches at knob ``value`` (the fixed ones where the knob is a weight)."""
        pr, shaping = self.pr, self.shaping
        if self.knob.startswith("pr."):
            pr = _replace(pr, self.knob, value, self.name)
        elif self.knob.startswith("shaping."):
            shaping = _replace(shaping, self.knob, value, self.name)
        return pr, shaping

    def variant_name(self, value: float) -> str:
        return f"{self.name}@{value:g}"

    def knob_value(self, row: dict) -> float:
        """The knob value a result row was sampled at."""
        if self.knob in ("w_cons", "w_text"):
            return float(row[self.knob])
        return float(row["variant"].rsplit("@", 1)[1])


def _replace(switches, knob: str, value: float, rule: str):
    name = knob.split(".", 1)[1]
    if name not in {f.name for f in dataclasses.fields(switches)}:
        raise ValueError(f"rule {rule!r}: knob {knob!r} names no field of {type(switches).__name__}")
    return dataclasses.replace(switches, **{name: value})


def _rule(name, mode, values, knob="w_cons", description="", **switches) -> FrontierRule:
    return FrontierRule(name, mode, knob, tuple(values), description=description, **switches)


#: The default rules: the baseline, the paper's rules, and the rules that act where a scalar cannot
#: (when in the trajectory, where in the image, adapted to the step's statistics).
DEFAULT_RULES: tuple[FrontierRule, ...] = (
    _rule("consistency", "consistency", (0.0, 0.5, 1.0, 1.5, 2.25, 3.0, 4.5),
          description="baseline: plain consistency guidance, w_cons swept"),
    _rule("early-consistency", "consistency", (3.0, 6.0, 9.0, 12.0),
          shaping=ConsistencyShaping(stop=0.4), description="consistency guidance in the first 40% of steps only"),
    _rule("late-consistency", "consistency", (1.0, 2.0, 3.0, 4.5),
          shaping=ConsistencyShaping(start=0.4), description="consistency guidance in the last 60% of steps only"),
    _rule("decreasing", "consistency", (1.5, 3.0, 4.5, 6.0),
          shaping=ConsistencyShaping(schedule="linear-decrease"),
          description="w_cons ramps down linearly from w to 0 over the trajectory"),
    _rule("cosine-decreasing", "consistency", (1.5, 3.0, 4.5, 6.0),
          shaping=ConsistencyShaping(schedule="cosine-decrease"),
          description="w_cons falls from w to 0 along a half cosine"),
    _rule("norm-bounded", "norm-bounded", (0.05, 0.1, 0.2, 0.4), knob="shaping.norm_bound", w_cons=6.0,
          description="||w_cons g_cons|| <= r ||w_text g_text|| per location at w_cons 6, r swept"),
    _rule("magnitude-weighted", "magnitude-weighted", (0.25, 0.5, 1.0, 2.0), knob="shaping.magnitude_ratio",
          w_cons=6.0, description="w_cons 6 shrunk as ||g_cons|| / ||g_text|| grows, ratio0 swept"),
    _rule("adaptive-parallel", "adaptive-parallel", (1.5, 3.0, 4.5),
          description="net projection of the consistency term on g_text set to zero each step"),
    _rule("late-pr", "late-pr", (0.25, 0.5, 0.75, 1.0), knob="shaping.pr_from",
          description="consistency guidance until pr_from, PR after it (w_cons 3), pr_from swept"),
    _rule("pr", "parallel-rescaled", (1.5, 3.0, 4.5, 6.0), description="parallel rescaling (SPEC defaults)"),
    _rule("consistency-w_text", "consistency", (3.0, 5.0, 7.5, 10.0), knob="w_text",
          description="plain consistency guidance at w_cons 3, w_text swept"),
)


def _default_prompt_sets() -> tuple[PromptSetConfig, ...]:
    from dreamguide.toyworld.prompts import PROMPT_SETS

    return (PromptSetConfig("normal", PROMPT_SETS["normal"][::2]),
            PromptSetConfig("stylized", PROMPT_SETS["stylized"] + PROMPT_SETS["stylized_scene"]))


@dataclass(frozen=True)
class FrontierExperiment:
    """What to sweep and on what: subjects, adapter kinds, prompt sets, seeds, rules."""

    subjects: tuple[str, ...] = ()  # () = all six
    adapters: tuple[str, ...] = ("dreambooth-ti", "dco")
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    steps: int = 20
    personalize: PersonalizeSettings = field(default_factory=PersonalizeSettings)
    #: Normal: every other prompt of PROMPT_SETS["normal"] (backgrounds, recolourings, edits); stylized: every
    #: style alone and with a scene.
    prompt_sets: tuple[PromptSetConfig, ...] = field(default_factory=_default_prompt_sets)
    baseline: str = "consistency"
    rules: tuple[FrontierRule, ...] = DEFAULT_RULES
    #: Interpolation grid over the common text range, bootstrap resamples and confidence.
    grid_points: int = 21
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 0
    confidence: float = 0.95
    #: A run stopped by its time budget: compare every rule on the units all share ("shared-units";
    #: a rule with a point on fewer than half the units is left out), or only finished points
    #: ("finished-points": every unit and seed). Either way unfinished rules are listed.
    unfinished: str = "shared-units"
    #: Batched sampling: images per sampler call (0: 4 on a CPU, 256 on a GPU), groups per generate call.
    batch_size: int = 0
    groups_per_call: int = 64

    def validate(self, source: str) -> "FrontierExperiment":
        from dreamguide.config import ConfigError

        names = [r.name for r in self.rules]
        if self.unfinished not in UNFINISHED:
            raise ConfigError(f"{source}: unfinished = {self.unfinished!r}; choose one of {', '.join(UNFINISHED)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"{source}: two rules are named {next(n for n in names if names.count(n) > 1)!r}")
        if self.baseline not in names:
            raise ConfigError(f"{source}: baseline {self.baseline!r} is not one of the rules ({', '.join(names)})")
        for rule in self.rules:
            if not rule.reference:
                continue
            if rule.reference not in names or rule.reference == rule.name:
                raise ConfigError(f"{source}: rule {rule.name!r} has reference {rule.reference!r}, which is not "
                                  f"another rule ({', '.join(names)})")
            other = self.rule(rule.reference)
            if other.knob != rule.knob or not set(rule.values) & set(other.values):
                raise ConfigError(f"{source}: rule {rule.name!r} and its reference {rule.reference!r} must sweep "
                                  f"the same knob over shared values (got {rule.knob} {list(rule.values)} and "
                                  f"{other.knob} {list(other.values)})")
        try:
            self.experiment().validate(source)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return self

    def rule(self, name: str) -> FrontierRule:
        return {r.name: r for r in self.rules}[name]

    def experiment(self) -> ToyExperiment:
        """The rules as a toy-world experiment: one plan per rule, knob values as weights or variants."""
        plans, variants = [], []
        sets = tuple(s.name for s in self.prompt_sets)
        for rule in self.rules:
            pr, shaping = rule.switches(rule.values[0])
            weights = {"w_text": (rule.w_text,), "w_cons": (rule.w_cons,)}
            plan_variants: tuple[str, ...] = ()
            steps = rule.personalized_steps
            if rule.knob in weights:
                weights[rule.knob] = rule.values
                if (pr, shaping, steps) != (ParallelRescaling(), ConsistencyShaping(), EVERY_STEP):
                    variants.append(Variant(rule.name, pr, shaping=shaping, personalized_steps=steps))
                    plan_variants = (rule.name,)
            else:
                for value in rule.values:
                    pr, shaping = rule.switches(value)
                    variants.append(Variant(rule.variant_name(value), pr, shaping=shaping, personalized_steps=steps))
                plan_variants = tuple(rule.variant_name(v) for v in rule.values)
            plans.append(PlanConfig(rule.name, self.adapters, sets, modes=(rule.mode,), w_text=weights["w_text"],
                                    w_cons=weights["w_cons"], variants=plan_variants, title=rule.description,
                                    metrics=("text_alignment", "identity")))
        return ToyExperiment(subjects=self.subjects, seeds=self.seeds, steps=self.steps,
                             personalize=self.personalize, prompt_sets=self.prompt_sets, variants=tuple(variants),
                             plans=tuple(plans), trace=False, batch_size=self.batch_size,
                             groups_per_call=self.groups_per_call,
                             report=ExperimentReport(baseline_mode="consistency", compare=(), pareto_plans=(),
                                                     trace_plans=()))


def load_frontier_experiment(path=None, overrides: Sequence[str] = ()) -> FrontierExperiment:
    """Read a frontier config (TOML; ``None``: the defaults) and apply ``key=value`` overrides."""
    from dreamguide.config import apply_overrides, from_dict, read_toml

    source = "the default frontier experiment" if path is None else str(path)
    data = {} if path is None else read_toml(path)
    if overrides:
        source += " (with --set overrides)"
    return from_dict(FrontierExperiment, apply_overrides(FrontierExperiment, data, overrides), source).validate(source)


# ---------------------------------------------------------------------------------------------
# Reading a run back as curves


def rule_rows(frontier: FrontierExperiment, out) -> dict[str, list[dict]]:
    """Each rule's finished result rows, with the knob value of each row under ``knob``; rows of adapters
    the runner skipped (:func:`skipped_rules`) are left out."""
    from dreamguide.evaluation.runner import build_jobs, ordered_rows, read_manifests

    experiment = frontier.experiment()
    out = Path(out)
    rows: dict[str, list[dict]] = {}
    skipped = skipped_rules(frontier, out)
    for plan in experiment.plans:
        rule = frontier.rule(plan.name)
        world = experiment.world(plan, steps=None)
        folder = out / plan.name
        done = read_manifests(folder) if (folder / "manifest").is_dir() else {}
        left_out = {(e["subject"], e["adapter"]) for e in skipped.get(rule.name, [])}
        found = [row for row in ordered_rows(build_jobs(world, experiment.plan(plan)), done)
                 if (row["subject"], row["adapter"]) not in left_out]
        rows[rule.name] = [{**row, "rule": rule.name, "knob": rule.knob_value(row)} for row in found]
    return rows


#: What one unit of the comparisons is: a subject's adapter on one prompt (its seeds averaged).
UNIT_KEYS = ("subject", "adapter", "template", "prompt_index")


#: How a run with unfinished rules is compared (``FrontierExperiment.unfinished``).
UNFINISHED = ("shared-units", "finished-points")


def _complete_rules(frontier: FrontierExperiment, rows: list[dict]) -> tuple[list[dict], dict[str, dict]]:
    """The rows the comparison uses when some rule is unfinished, and each unfinished rule's state.

    ``shared-units``: every rule, compared on the units its and every other rule's points share,
    except a rule with a point on fewer than half the units of the slice (left out: it would shrink
    every comparison). ``finished-points``: only knob values with every unit and seed; a rule keeps
    its finished points if it has two or more.
    """
    units = {tuple(row[k] for k in UNIT_KEYS) for row in rows}
    cells: dict[tuple, set] = {}
    counts: dict[tuple, int] = {}
    for row in rows:
        key = (row["rule"], float(row["knob"]))
        cells.setdefault(key, set()).add(tuple(row[k] for k in UNIT_KEYS))
        counts[key] = counts.get(key, 0) + 1
    full = len(units) * len(frontier.seeds)
    incomplete, keep = {}, set()
    for rule in frontier.rules:
        done = [counts.get((rule.name, float(v)), 0) for v in rule.values]
        if not any(done):
            continue
        if all(n == full for n in done):
            keep.update((rule.name, float(v)) for v in rule.values)
            continue
        if frontier.unfinished == "shared-units":
            covered = min(len(cells.get((rule.name, float(v)), ())) for v in rule.values) / len(units)
            kept = [float(v) for v in rule.values] if covered >= 0.5 else []
        else:
            finished = [float(v) for v, n in zip(rule.values, done) if n == full]
            kept = finished if len(finished) >= 2 else []
        keep.update((rule.name, v) for v in kept)
        incomplete[rule.name] = {"done": round(sum(done) / (full * len(rule.values)), 3), "values_kept": kept}
    return [row for row in rows if (row["rule"], float(row["knob"])) in keep], incomplete


def skipped_rules(frontier: FrontierExperiment, out) -> dict[str, list[dict]]:
    """Per rule, the adapters its run skipped (``runner.skipped_adapters``); rules that skipped none are absent."""
    from dreamguide.evaluation.runner import skipped_adapters

    experiment = frontier.experiment()
    found = {}
    for plan in experiment.plans:
        entries = skipped_adapters(experiment.world(plan, steps=None), experiment.plan(plan), Path(out) / plan.name)
        if entries:
            found[frontier.rule(plan.name).name] = entries
    return found


def analyse(frontier: FrontierExperiment, rows: dict[str, list[dict]]) -> dict:
    """Curves and comparisons with the baseline, for every (adapter kind, prompt set) slice."""
    from dreamguide.evaluation import frontier as analysis

    slices = [(kind, s.name) for kind in frontier.adapters for s in frontier.prompt_sets]
    out = {"baseline": frontier.baseline, "rules": {r.name: {"mode": r.mode, "knob": r.knob,
                                                               "values": list(r.values),
                                                               "description": r.description,
                                                               **({"personalized_steps":
                                                                   r.personalized_steps.describe(),
                                                                   "evaluated_fraction":
                                                                   r.personalized_steps.evaluated_fraction(
                                                                       frontier.steps)}
                                                                  if r.personalized_steps != EVERY_STEP else {}),
                                                               **({"reference": r.reference}
                                                                  if r.reference else {})}
                                                      for r in frontier.rules}, "slices": []}
    for kind, prompt_set in slices:
        selected = [row for rule_rows_ in rows.values() for row in rule_rows_
                    if row["adapter"] == kind and row["prompt_set"] == prompt_set]
        if not selected:
            continue
        selected, incomplete = _complete_rules(frontier, selected)
        units, table = analysis.unit_table(selected, unit_keys=UNIT_KEYS, text_key="text_alignment",
                                           identity_key="identity")
        entry = {"adapter": kind, "prompt_set": prompt_set, "units": len(units), "curves": {}, "compared": []}
        if incomplete:  # written only when some rule is unfinished: earlier runs' records stay equal
            entry["incomplete"] = incomplete
        present = sorted({rule for rule, _ in table}, key=[r.name for r in frontier.rules].index)
        for name in present:
            entry["curves"][name] = analysis.curve_summary(table, len(units), name, frontier.bootstrap_samples,
                                                           frontier.bootstrap_seed, frontier.confidence)
        if frontier.baseline in present:
            for name in present:
                if name != frontier.baseline:
                    entry["compared"].append(analysis.compare(
                        table, len(units), name, frontier.baseline, frontier.bootstrap_samples,
                        frontier.bootstrap_seed, frontier.grid_points, frontier.confidence))
        for rule in frontier.rules:
            if rule.reference and rule.name in present and rule.reference in present:
                entry.setdefault("paired", []).append(analysis.paired_at_knob(
                    table, len(units), rule.name, rule.reference, frontier.bootstrap_samples,
                    frontier.bootstrap_seed, frontier.confidence))
        out["slices"].append(entry)
    return out


def write_frontier_results(frontier: FrontierExperiment, out, log=print) -> dict:
    """Analyse a run folder; write frontier.json, frontier.md and frontier.png into it."""
    from dreamguide.atomic import atomic_write_text
    from dreamguide.evaluation import frontier as analysis

    out = Path(out)
    rows = rule_rows(frontier, out)
    if not any(rows.values()):
        raise FileNotFoundError(f"{out} holds no finished images of this frontier experiment; generate first")
    results = analyse(frontier, rows)
    skipped = skipped_rules(frontier, out)
    if skipped:  # written only when there are any: the results of complete runs read as before
        results["skipped"] = skipped
    record = out / "generate.json"
    results["run"] = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
    atomic_write_text(out / FRONTIER_FILE, json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "frontier.md", analysis.frontier_markdown(results))
    analysis.plot_frontier(results, out / "frontier.png")
    log(f"wrote {out / 'frontier.md'}, {out / FRONTIER_FILE} and {out / 'frontier.png'}")
    return results
