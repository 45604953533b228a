"""Tables from a suite's run records (DESIGN.md §5). Torch-free and pandas-free: tabulate only.

* :mod:`~kdbench.tables.paper`: ``make_table``, the paper table (mean ± std over seeds, Δ vs the baseline,
  best in bold, published references, footnotes), and the entry to the other layouts;
* :mod:`~kdbench.tables.robustness`: the corruption-robustness layout (mPC/rPC, mCE);
* :mod:`~kdbench.tables.cost`: the training-cost layout;
* :mod:`~kdbench.tables.status`: ``status_table``, the state of every run folder (``kdbench status``);
* :mod:`~kdbench.tables.records`: which records a table shows (newest configuration, one per seed) and in
  which order;
* :mod:`~kdbench.tables.render`: number formatting, LaTeX escaping, footnotes, pipe/booktabs blocks, CSV.

Loading a suite's records is :mod:`kdbench.results`' (``load_suite_records``, ``one_version``).
"""

from kdbench.tables.cost import cost_table
from kdbench.tables.paper import CSV_COLUMNS, LAYOUTS, SELECTS, Cell, make_table
from kdbench.tables.records import BASELINE, EVAL_KIND, TABLE_KINDS, TASK_METRICS, TEACHER
from kdbench.tables.render import FORMATS, latex_escape
from kdbench.tables.robustness import robustness_entries, robustness_table
from kdbench.tables.status import status_table

__all__ = ["make_table", "robustness_table", "cost_table", "status_table", "latex_escape", "Cell", "FORMATS",
           "LAYOUTS", "TASK_METRICS", "SELECTS", "CSV_COLUMNS", "BASELINE", "TEACHER", "TABLE_KINDS", "EVAL_KIND",
           "robustness_entries"]
