"""HTML of the page's result views: the comparison grid, its per-mode summary and the training progress.

Images are served by the web app from the workspace's output folder (``file_url``); every image
in the grid links to its PNG, which carries its settings in the metadata.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from dreamguide.ui.training_job import JobState
    from dreamguide.ui.workspace import Comparison

#: The URL prefix under which the web app serves files from its allowed folders.
FILE_ROUTE = "/gradio_api/file="


def file_url(path: str | Path) -> str:
    return FILE_ROUTE + quote(str(Path(path).resolve()), safe="/")


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it, else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _mode_title(mode: str) -> str:
    from dreamguide.guidance import get_mode

    spec = get_mode(mode)
    return f"{spec.description}. Knob {spec.knob}: {spec.strength}"


def grid_html(comparison: "Comparison") -> str:
    """The grid: a column per mode, a row per seed; each image with its scores and a download link."""
    from dreamguide.ui.workspace import mode_label

    done = len(comparison.results) == len(comparison.modes) * len(comparison.seeds)
    cells = {(r.mode, r.seed): (r, path) for r, path in zip(comparison.results, comparison.images)}
    scores = dict(zip(((r.mode, r.seed) for r in comparison.results), comparison.scores or []))
    head = "".join(
        f'<th data-mode="{escape(m)}" title="{escape(_mode_title(m))}">{escape(mode_label(m))}</th>'
        for m in comparison.modes
    )
    rows = []
    for seed in comparison.seeds:
        tds = []
        for mode in comparison.modes:
            if (mode, seed) not in cells:
                tds.append(f'<td class="dg-pending" data-mode="{escape(mode)}" data-seed="{seed}">sampling ...</td>')
                continue
            result, path = cells[mode, seed]
            url = file_url(path)
            score = scores.get((mode, seed))
            score_html = "" if score is None else (
                f'<div class="dg-score">id {score.identity:.3f} · text {score.text_alignment:.3f}</div>'
            )
            tds.append(
                f'<td data-mode="{escape(mode)}" data-seed="{seed}">'
                f'<img src="{url}" alt="{escape(mode_label(mode))}, seed {seed}" '
                f'title="{escape(result.prompt)} ({escape(mode)}, seed {seed})">'
                f"{score_html}"
                f'<a class="dg-download" href="{url}" download="{escape(path.name)}">{escape(path.name)}</a></td>'
            )
        rows.append(f'<tr data-seed="{seed}"><th>seed {seed}</th>{"".join(tds)}</tr>')
    status = (
        f"{len(comparison.results)} images in {comparison.seconds:.1f} s"
        + ("" if done else f" (of {len(comparison.modes) * len(comparison.seeds)}; sampling the rest)")
        + f" · <code>{escape(_shown_path(comparison.folder))}</code>"
    )
    return (
        f'<div class="dg-grid" data-done="{int(done)}"><p class="dg-status">{status}</p>'
        f'<table><thead><tr><th>seed \\ mode</th>{head}</tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table></div>'
    )


def summary_html(comparison: "Comparison") -> str:
    """Per mode: the mean identity and text alignment of its images (the trade-off plot's points)."""
    from dreamguide.ui.scores import mode_means
    from dreamguide.ui.workspace import mode_label

    if comparison.scores is None:
        return f'<p class="dg-note">{escape(comparison.note)}</p>' if comparison.note else ""
    identity, text = comparison.score_names
    means = mode_means([r.mode for r in comparison.results], comparison.scores)
    rows = "".join(
        f'<tr data-mode="{escape(mode)}"><td>{escape(mode_label(mode))}</td><td>{m.identity:.3f}</td>'
        f"<td>{m.text_alignment:.3f}</td></tr>"
        for mode, m in means.items()
    )
    return (
        f'<table class="dg-summary"><thead><tr><th>mode</th><th>{escape(identity)}</th><th>{escape(text)}</th>'
        f"</tr></thead><tbody>{rows}</tbody></table>"
        f'<p class="dg-note">Mean over the seeds. Text alignment scores the base prompt '
        f"(<code>{escape(comparison.settings.base_prompt)}</code>); identity, the subject's reference photos.</p>"
    )


def progress_html(state: "JobState | None") -> str:
    """A progress bar with the step, the loss and the time left."""
    if state is None:
        return '<div class="dg-progress" data-status="none">no training run yet</div>'
    eta = state.eta_seconds
    left = f" · about {eta / 60:.1f} min left" if eta is not None and state.live else ""
    speed = f" · {state.seconds_per_step:.2f} s/step" if state.seconds_per_step else ""
    return (
        f'<div class="dg-progress" data-status="{escape(state.status)}" data-step="{state.step}">'
        f'<progress max="{state.total}" value="{state.step}"></progress> '
        f"<span>{escape(state.status)}: {escape(state.message)}{speed}{left}</span></div>"
    )


def error_html(message: str) -> str:
    return f'<div class="dg-error">{escape(message)}</div>' if message else ""
