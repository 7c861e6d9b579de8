"""Reports: report.md, summary.json and curves for one run folder (run_report), and tables aggregated over
many (table: mean ± std over seeds, one row per experiment)."""
from kdforge.report.run_report import curves_figure, plot_curves, write_run_report
from kdforge.report.table import aggregate, find_runs, load_runs

__all__ = ["aggregate", "curves_figure", "find_runs", "load_runs", "plot_curves", "write_run_report"]
