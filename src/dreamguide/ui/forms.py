"""Form values -> validated settings, every bad value reported against its field.

Each value goes through the code the command line runs for the same flag or key, so a bad one
gets the command line's message: sampling values are read as ``dreamguide sample`` reads its
flags (``parse_seeds``, ``parse_modes``, ``SampleSettings``, ``ParallelRescaling``), training
values as ``dreamguide train --set section.key=value`` reads them (``parse_override``, then
``train_config_from_dict``), photos as the trainer reads its data folder. :class:`FieldErrors`
carries field -> message; the page shows each message under its field.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from dreamguide.sampling import SampleSettings
    from dreamguide.training import TrainConfig

_T = TypeVar("_T")

#: Where a message that belongs to no one field is shown.
GENERAL = "general"


class FieldErrors(ValueError):
    """Bad form values: field name -> the message the command line gives for that value."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"{name}: {message}" for name, message in self.errors.items()))


class FieldChecks:
    """Runs one check per field and keeps the first message of each field."""

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}

    def check(self, name: str, fn: Callable[[], _T]) -> _T | None:
        try:
            return fn()
        except (ValueError, FileNotFoundError) as error:
            self.errors.setdefault(name, str(error))
            return None

    def raise_if_any(self) -> None:
        if self.errors:
            raise FieldErrors(self.errors)


def read_float(text: Any, flag: str) -> float:
    """A number typed into a form, read the way argparse reads a ``type=float`` flag ("nan" is a float)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        return float(str(text).strip())
    except ValueError:
        raise ValueError(f"argument {flag}: invalid float value: {str(text)!r}") from None


def read_steps(value: Any) -> int:
    """The number of denoising steps from a number field (a whole float counts as an int)."""
    from dreamguide.sampling import SampleSettings, check_run

    if isinstance(value, float) and value.is_integer():
        value = int(value)
    check_run(value, SampleSettings.batch_size, SampleSettings.scheduler)
    return value


# ---------------------------------------------------------------------------------------------
# Sampling


def _preview_steps() -> int:
    from dreamguide.sample_settings import PREVIEW_STEPS

    return PREVIEW_STEPS


def _weight_defaults() -> tuple[float, float]:
    from dreamguide.guidance import W_CONS, W_TEXT

    return W_TEXT, W_CONS


def _pr_defaults() -> dict:
    from dreamguide.guidance import ParallelRescaling

    return ParallelRescaling().to_dict()


@dataclass
class SampleForm:
    """The values of the sample form, as the page holds them (numbers as typed text).

    ``shaping`` holds text per ``ConsistencyShaping`` field; a blank keeps the field's default
    (``None``, "no cap", for the optional caps).
    """

    prompt: str
    token: str | None = None
    class_word: str | None = None
    base_prompt: str = ""
    negative_prompt: str = ""
    seeds: str = "0,1"
    steps: Any = field(default_factory=_preview_steps)
    w_text: Any = field(default_factory=lambda: str(_weight_defaults()[0]))
    w_cons: Any = field(default_factory=lambda: str(_weight_defaults()[1]))
    modes: Sequence[str] = ("cfg", "dreambooth", "consistency", "parallel-rescaled")
    pr_granularity: str = field(default_factory=lambda: _pr_defaults()["granularity"])
    pr_normalization: str = field(default_factory=lambda: _pr_defaults()["normalization"])
    pr_rescale: Any = field(default_factory=lambda: str(_pr_defaults()["rescale"]))
    pr_eps: Any = field(default_factory=lambda: str(_pr_defaults()["eps"]))
    shaping: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None


def _shaping(values: dict[str, Any]):
    from dreamguide.guidance import ConsistencyShaping

    known = {f.name: f for f in fields(ConsistencyShaping)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown consistency shaping field(s) {unknown}; valid: {', '.join(known)}")
    kwargs: dict[str, Any] = {}
    for name, text in values.items():
        if text is None or (isinstance(text, str) and not text.strip()):
            continue  # the field's default
        if name == "schedule":
            kwargs[name] = str(text).strip()
        else:
            kwargs[name] = read_float(text, f"ConsistencyShaping.{name}")
    return ConsistencyShaping(**kwargs)


def sample_settings(form: SampleForm) -> "SampleSettings":
    """``SampleSettings`` (with the Consistency_p trace on) from the form, or :class:`FieldErrors`.

    Fields: ``prompt``, ``seeds``, ``steps``, ``w_text``, ``w_cons``, ``modes``, ``pr``, ``shaping``.
    """
    from dreamguide.guidance import ParallelRescaling
    from dreamguide.sampling import SampleSettings, check_finite, parse_modes, parse_seeds

    found = FieldChecks()
    seeds = found.check("seeds", lambda: parse_seeds(form.seeds))
    modes = found.check("modes", lambda: parse_modes(form.modes or ()))
    steps = found.check("steps", lambda: read_steps(form.steps))
    w_text = found.check("w_text", lambda: check_finite("w_text", read_float(form.w_text, "--w-text")))
    w_cons = found.check("w_cons", lambda: check_finite("w_cons", read_float(form.w_cons, "--w-cons")))
    pr = found.check("pr", lambda: ParallelRescaling(
        granularity=form.pr_granularity, normalization=form.pr_normalization,
        rescale=read_float(form.pr_rescale, "--pr-rescale"), eps=read_float(form.pr_eps, "--pr-eps"),
    ))
    shaping = found.check("shaping", lambda: _shaping(form.shaping))
    prompts = dict(prompt=form.prompt, token=form.token or None, class_word=form.class_word or None,
                   base_prompt=form.base_prompt.strip() or None, negative_prompt=form.negative_prompt or "")
    found.check("prompt", lambda: SampleSettings(**prompts))
    found.raise_if_any()
    batch = {} if form.batch_size is None else {"batch_size": form.batch_size}
    return SampleSettings(**prompts, modes=modes, seeds=seeds, steps=steps, w_text=w_text, w_cons=w_cons, pr=pr,
                          shaping=shaping, trace=True, **batch)


# ---------------------------------------------------------------------------------------------
# Training

#: Form field -> the config key it sets (``dreamguide train --set KEY=VALUE``).
TRAIN_KEYS: dict[str, str] = {
    "token": "data.token",
    "class_word": "data.class_word",
    "method": "train.method",
    "steps": "train.steps",
    "lr": "train.lr",
    "rank": "lora.rank",
    "batch_size": "train.batch_size",
    "sample_every": "sample.every",
}
#: Config key -> the form field that shows its message (keys not listed: the general message).
FIELD_OF_KEY: dict[str, str] = {
    **{key: name for name, key in TRAIN_KEYS.items()},
    "lora.alpha": "rank",
    "data.instance_dir": "photos",
    "sample.prompts": "token",
}
#: Form source named in training config messages (where the command line names the TOML file).
TRAIN_SOURCE = "personalize form"


@dataclass
class TrainForm:
    """The values of the personalize form, as typed (read like ``--set`` values); a blank setting
    keeps the run's default (:meth:`dreamguide.ui.workspace.Workspace.train_base`)."""

    token: str
    class_word: str
    method: str = ""
    steps: Any = ""
    lr: Any = ""
    rank: Any = ""
    batch_size: Any = ""
    sample_every: Any = ""


def _field_of_config_error(message: str) -> str:
    match = re.search(r"(?:^|: )([a-z_]+\.[a-z_]+)\b", message)
    return FIELD_OF_KEY.get(match[1], GENERAL) if match else GENERAL


def train_config(form: TrainForm, base: dict[str, Any], found: FieldChecks | None = None) -> "TrainConfig | None":
    """The run config: ``base`` (nested sections, as a TOML file holds them) with the form's values
    set as ``--set key=value`` overrides (LoRA alpha = rank); a bad value is reported against its
    field, into ``found`` when given (then None is returned for a config that does not build)."""
    from dreamguide.config import ConfigError, parse_override
    from dreamguide.training import train_config_from_dict

    own = found is None
    found = found or FieldChecks()
    data = {section: dict(values) for section, values in base.items()}
    for name, key in TRAIN_KEYS.items():
        text = str(getattr(form, name)).strip()
        if name in ("token", "class_word"):
            value: Any = text  # string keys take the raw text, as --set does for them
        elif not text:
            continue  # blank: the run's default
        elif name == "method":
            value = text
        else:
            value = found.check(name, lambda: parse_override(f"{key}={text}")[1])
            if name in found.errors:
                continue
        section, _, option = key.partition(".")
        data.setdefault(section, {})[option] = value
    rank = data.get("lora", {}).get("rank")
    if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0:
        data["lora"]["alpha"] = float(rank)  # alpha follows the rank: the LoRA's scale stays 1
    config = None
    try:
        config = train_config_from_dict(data, source=TRAIN_SOURCE)
    except ConfigError as error:
        found.errors.setdefault(_field_of_config_error(str(error)), str(error))
    if own:
        found.raise_if_any()
    return config


def write_photos(photos: Sequence[str | Path], captions: str, folder: Path) -> list[Path]:
    """Copy uploaded photos into ``folder`` under their own names (``name-<i>`` when two share one); line
    i of ``captions`` (if not blank) becomes the same-name ``.txt`` caption, the trainer's dataset layout."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = captions.splitlines() if captions else []
    if len(lines) > len(photos) and any(line.strip() for line in lines[len(photos):]):
        raise ValueError(
            f"{len(lines)} caption lines for {len(photos)} photos; write one caption per photo, in upload order "
            "(a blank line keeps the default caption)"
        )
    written = []
    for i, source in enumerate(photos):
        source = Path(source)
        target = folder / f"{source.stem}{source.suffix.lower()}"
        if target.exists() or target.with_suffix(".txt").exists():
            target = folder / f"{source.stem}-{i}{source.suffix.lower()}"
        shutil.copyfile(source, target)
        if i < len(lines) and lines[i].strip():
            target.with_suffix(".txt").write_text(lines[i].strip() + "\n", encoding="utf-8")
        written.append(target)
    return written


def check_photos(folder: str | Path, token: str, class_word: str) -> None:
    """The trainer's own data checks, before training: there are photos, every one decodes, and (when
    the token and class word are given) every caption holds the token."""
    from dreamguide.training import TrainConfig
    from dreamguide.training.data import list_images, open_training_image, scan_instance_folder

    for path in list_images(folder, "instance"):
        open_training_image(path)
    if token and class_word:
        scan_instance_folder(folder, token, class_word, TrainConfig().data.instance_prompt)


def photo_error_field(message: str) -> str:
    """``captions`` for a caption problem, ``photos`` for the rest of the data errors."""
    return "captions" if "caption" in message.split(";")[0] else "photos"
