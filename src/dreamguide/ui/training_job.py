"""A fine-tuning run in a background thread, watched by the page: progress, loss, samples, cancel, resume.

The run is ``dreamguide.training.train(config)`` itself, so it writes what ``dreamguide train``
writes (``log.jsonl``, ``samples/step-<step>/``, ``checkpoint-<step>/``, the adapter files) and
the page reads its progress from there. Cancelling asks the trainer to stop after the current
step; it saves a checkpoint first, and :meth:`TrainingJob.resume` continues the run exactly.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dreamguide.filenames import CONFIG_FILE, EMBEDDINGS_FILE, LOG_FILE, LORA_FILE, SAMPLES_DIR, kohya_file, shared_embeddings_file

if TYPE_CHECKING:
    from dreamguide.training import TrainConfig, TrainResult

#: A job's states; ``running`` and ``cancelling`` have a live thread.
STATES = ("ready", "running", "cancelling", "stopped", "done", "failed")


@dataclass(frozen=True)
class JobState:
    """What the page shows of a run at one moment."""

    status: str
    step: int
    total: int
    message: str
    #: Seconds per step over the steps run since the last start or resume (None before two steps).
    seconds_per_step: float | None

    @property
    def live(self) -> bool:
        return self.status in ("running", "cancelling")

    @property
    def eta_seconds(self) -> float | None:
        return None if self.seconds_per_step is None else self.seconds_per_step * (self.total - self.step)


class TrainingJob:
    """``train(config)`` in a daemon thread. ``on_finished(result)`` runs in that thread when the run
    completes (e.g. to sample with the new adapter); an error it raises marks the job failed."""

    def __init__(self, config: "TrainConfig", on_finished: Callable[["TrainResult"], None] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.on_finished = on_finished
        self.log = log or (lambda message: None)
        self.result: "TrainResult | None" = None
        self._status, self._message, self._step = "ready", "", 0
        self._step_times: list[float] = []
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output.dir)

    @property
    def total(self) -> int:
        return self.config.train.steps

    # -- control -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the run (once)."""
        with self._lock:
            if self._status != "ready":
                raise ValueError(f"this run was already started (it is {self._status}); start a new one")
            self._launch(resume=None)

    def resume(self) -> None:
        """Continue a cancelled run from its checkpoint."""
        with self._lock:
            if self._status != "stopped":
                raise ValueError(f"only a cancelled run can be resumed; this one is {self._status}")
            self._launch(resume="latest")

    def cancel(self) -> bool:
        """Ask a live run to stop after its current step (it saves a checkpoint); False if none is live."""
        with self._lock:
            if self._status != "running":
                return False
            self._cancel.set()
            self._status, self._message = "cancelling", "cancelling: saving a checkpoint after this step"
            return True

    def wait(self, timeout: float | None = None) -> JobState:
        """Block until the thread ends (or ``timeout`` seconds); return the state."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.state()

    def _launch(self, resume: str | None) -> None:
        self._cancel.clear()
        self._status, self._message, self._step_times = "running", "starting", []
        self._thread = threading.Thread(target=self._run, args=(resume,), name="dreamguide-training", daemon=True)
        self._thread.start()

    # -- the thread ----------------------------------------------------------------------------

    def _run(self, resume: str | None) -> None:
        from dreamguide.training import TrainingStopped, train

        try:
            result = train(self.config, resume=resume, progress=False, on_step=self._on_step)
        except TrainingStopped as stopped:
            self._finish("stopped", f"after step {stopped.step} of {self.total}; "
                                    f"Resume continues from {stopped.checkpoint.name}")
            return
        except (ValueError, FileNotFoundError, FloatingPointError) as error:
            self._finish("failed", str(error))
            return
        except Exception as error:  # noqa: BLE001 (the page must keep running; the trace goes to the log)
            self.log(traceback.format_exc())
            self._finish("failed", f"{type(error).__name__}: {error}")
            return
        self.result = result
        try:
            if self.on_finished is not None:
                self.on_finished(result)
        except Exception as error:  # noqa: BLE001
            self.log(traceback.format_exc())
            self._finish("failed", f"trained, but the adapter could not be loaded: {error}")
            return
        self._finish("done", f"{self.total} steps; the adapter is loaded for sampling")

    def _on_step(self, done: int, loss: float) -> bool:
        with self._lock:
            self._step = done
            self._step_times.append(time.monotonic())
            if self._status == "running":
                self._message = f"step {done} of {self.total}, loss {loss:.4f}"
            return self._cancel.is_set()

    def _finish(self, status: str, message: str) -> None:
        with self._lock:
            self._status, self._message = status, message

    # -- what the page reads -------------------------------------------------------------------

    def state(self) -> JobState:
        with self._lock:
            times = self._step_times
            per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) >= 2 else None
            return JobState(self._status, self._step, self.total, self._message, per_step)

    def losses(self) -> tuple[list[int], list[float]]:
        """(steps, losses) logged so far (``log.jsonl``; after a resume, the whole run)."""
        path = self.output_dir / LOG_FILE
        steps, losses = [], []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line being written right now
                    continue
                steps.append(int(record["step"]))
                losses.append(float(record["loss"]))
        return steps, losses

    def latest_samples(self) -> tuple[int | None, list[Path]]:
        """(step, image files) of the newest complete set of sample images, or (None, [])."""
        root = self.output_dir / SAMPLES_DIR
        folders = sorted(root.glob("step-*")) if root.is_dir() else []
        for folder in reversed(folders):
            images = sorted(p for p in folder.glob("prompt-*/*.png") if p.name != "grid.png")
            if images and all((p / "settings.json").is_file() for p in folder.glob("prompt-*")):
                return int(folder.name.removeprefix("step-")), images
        return None, []

    def files(self) -> list[Path]:
        """The adapter files written so far (diffusers LoRA, Kohya LoRA, token embeddings, config)."""
        name = self.config.run_name
        names = (LORA_FILE, kohya_file(name), EMBEDDINGS_FILE, shared_embeddings_file(name), CONFIG_FILE)
        return [self.output_dir / name for name in names if (self.output_dir / name).is_file() and self.result]
