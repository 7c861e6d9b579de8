"""Reports: report.md + curves for one run folder, and tables aggregated over many (mean ± std over seeds)."""
from kdforge.report.run_report import aggregate, find_runs, plot_curves, write_run_report

__all__ = ["aggregate", "find_runs", "plot_curves", "write_run_report"]
