"""What a person running ``python -m training.run`` sees: a start block (run directory, device, data, phases, class
order, the keys set away from the bundled config), one progress bar for the whole run that moves every training
batch with the run's ETA (on a terminal; in a log, one line per epoch with the ETA), one-line statuses for the work
between epochs (box refreshes, memory updates, evaluation, unreadable images), the metrics table after each phase and
an end line. Only rank 0 prints."""
from __future__ import annotations

import sys
import time
import warnings

__all__ = ["Console", "changed_keys", "phase_sizes"]


def changed_keys(cfg, base) -> list[str]:
    """``key=value`` of every key of ``cfg`` that differs from ``base`` (two configs)."""
    ours, theirs = cfg.to_dict(), base.to_dict()
    return [f"{key}={ours[key]!r}" if isinstance(ours[key], str) else f"{key}={ours[key]}"
            for key in ours if ours[key] != theirs.get(key)]


def phase_sizes(stream) -> str:
    """``5 + 5 + 5 + 5`` (classes per phase)."""
    return " + ".join(str(len(p.classes)) for p in stream.phases)


def _short(values, limit: int = 12) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class _Lines:
    """A text stream whose complete lines go to ``write_line`` (for tables printed while the bar is shown)."""

    def __init__(self, write_line):
        self.write_line = write_line
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.write_line(line)
        return len(text)

    def flush(self) -> None:
        pass


class Console:
    """The run's console output.

    Args:
        enabled: print at all (rank 0).
        progress: show the progress bar (``cfg.progress``); statuses and tables are printed either way.
        stream: where to print (default sys.stdout).
    """

    def __init__(self, *, enabled: bool = True, progress: bool = True, stream=None):
        self.enabled = enabled
        self.progress = progress and enabled
        self.out = stream or sys.stdout
        self.bar = None
        self.epochs_done = 0.0
        self.total_epochs = 0.0
        self.description = ""
        self._clock = None  # (start, epochs done then) when progress is printed as lines, not as a bar
        self.lines = _Lines(self.status)

    # ---------------------------------------------------------------- blocks
    def start(self, *, out_dir, runtime, threads: int, cfg, source, stream, changed, resumed_at=None) -> None:
        """The start block."""
        state = "new run" if resumed_at is None else f"resumed at {resumed_at}"
        lines = [
            f"run {out_dir} ({state})",
            f"  device {runtime.device}" + (f" x {runtime.world_size} processes" if runtime.distributed else "")
            + f", {threads} CPU thread(s); learner {cfg.learner}, compression {cfg.compression}",
            f"  data {source.name}" + (f" ({source.root})" if source.root else "") + f": {source.num_classes} "
            f"classes, {len(source.train)} training / {len(source.test)} test images, {cfg.image_size or source.image_size}"
            " px",
            f"  {len(stream)} phases: {phase_sizes(stream)} classes; class order {_short(stream.order)}",
            "  set away from the bundled config: " + (_short(changed, 20) if changed else "nothing"),
        ]
        for line in lines:
            self.status(line)

    def end(self, text: str) -> None:
        self.close()
        self.status(text)

    # ---------------------------------------------------------------- progress
    def open_bar(self, total_epochs: float, done: float = 0.0) -> None:
        """The whole run's progress, in epochs (all stages of all phases): a tqdm bar on a terminal; elsewhere (a log
        file, a batch job's output) one line per finished epoch with the elapsed time and the whole run's ETA, since
        a bar's carriage returns would fill the log with one redrawn line."""
        self.epochs_done, self.total_epochs = float(done), float(total_epochs)
        if not self.progress:
            return
        isatty = getattr(self.out, "isatty", None)
        if not (isatty and isatty()):
            self._clock = (time.monotonic(), float(done))
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=float(total_epochs), initial=float(done), unit="epoch", dynamic_ncols=True,
                        file=self.out, bar_format="{desc} {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} epochs "
                                                  "[{elapsed}<{remaining}]")

    def batch(self, description: str, done: int, total: int) -> None:
        """The bar after batch ``done`` of ``total`` of the epoch in progress."""
        self.description = description
        if self.bar is not None:
            self.bar.set_description_str(description, refresh=False)
            self.bar.n = self.epochs_done + done / max(1, total)
            self.bar.refresh()

    def epoch_done(self, postfix: str = "") -> None:
        self.epochs_done += 1
        if self.bar is not None:
            self.bar.n = self.epochs_done
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.refresh()
        elif self._clock is not None:
            self.status(self.progress_line(postfix))

    def progress_line(self, postfix: str = "") -> str:
        """``<description> 12/40 epochs (30%) [1m05s elapsed, about 2m32s left]`` from the rate since the start."""
        started, first = self._clock
        elapsed = time.monotonic() - started
        done, total = self.epochs_done, self.total_epochs
        left = elapsed / (done - first) * max(0.0, total - done) if done > first else None
        eta = "" if left is None else f", about {_duration(left)} left"
        line = f"{self.description} {done:.0f}/{total:.0f} epochs ({100 * done / max(total, 1e-9):.0f}%) "
        return line.lstrip() + f"[{_duration(elapsed)} elapsed{eta}]" + (f" {postfix}" if postfix else "")

    def status(self, text: str) -> None:
        """One line, above the bar when it is shown."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # ---------------------------------------------------------------- warnings
    def route_warnings(self, category) -> None:
        """Print warnings of ``category`` (unreadable images) as single status lines instead of Python's two-line
        format on stderr. The warnings themselves are untouched (filters, ``catch_warnings(record=True)``): only
        their text, when they are shown, goes through the console."""
        previous = warnings.formatwarning

        def text(message, kind, filename, lineno, line=None):
            if not issubclass(kind, category):
                return previous(message, kind, filename, lineno, line)
            self.status(f"warning: {message}")
            return ""

        warnings.formatwarning = text
        self._restore_warnings = lambda: setattr(warnings, "formatwarning", previous)

    def restore_warnings(self) -> None:
        getattr(self, "_restore_warnings", lambda: None)()
