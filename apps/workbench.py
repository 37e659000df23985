"""The wpeft workbench for ``panel serve``: ``panel serve apps/workbench.py --args RUNS_DIR``.

A thin entry point: the app lives in :mod:`wpeft.app.workbench` (``wpeft serve RUNS_DIR`` and
``python -m wpeft.app.serve RUNS_DIR`` serve the same page with safer defaults). Panel runs this
file once per browser session, so every session gets its own widgets.
"""

import sys

import panel as pn

from wpeft.app.catalog import RunsDirError
from wpeft.app.workbench import alert_html, build_workbench, runs_dir_from_argv

try:
    page = build_workbench(runs_dir_from_argv(sys.argv[1:]))
except RunsDirError as error:
    page = pn.pane.HTML(alert_html(str(error)))
page.servable(title="wpeft workbench")
