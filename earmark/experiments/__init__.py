"""The experiment harness: run, compare and tune learners on scenarios, beside the product (``Model``).

It uses the same pieces as the product (datasets, base training, embedder, learners, metrics) and
writes run folders of results; nothing in the product reads them.
"""

from earmark.experiments.config import RunConfig, run_config_from_dict
from earmark.experiments.prepare import Prepared, prepare
from earmark.experiments.report import render_report
from earmark.experiments.run import run

# compare() and tune() live in their modules (earmark.experiments.compare / .tune), not re-exported here, so
# the module names stay importable.
__all__ = ["Prepared", "RunConfig", "prepare", "render_report", "run", "run_config_from_dict"]
