"""What a run shows a person: live progress, files in the run directory, terminal tables."""

from .files import LiveFiles, plot_trials, summary_dict, trial_row, write_run_files, write_summary, write_trials_csv
from .progress import live_progress
from .view import RunView, left_alone_table, load_run, run_counts, summary_table, trials_table

__all__ = [
    "LiveFiles",
    "RunView",
    "left_alone_table",
    "live_progress",
    "load_run",
    "plot_trials",
    "run_counts",
    "summary_dict",
    "summary_table",
    "trial_row",
    "trials_table",
    "write_run_files",
    "write_summary",
    "write_trials_csv",
]
