"""Studies built on the workflow: several trainings of one workflow, compared and recorded together.

Orchestration layer (like `medtl.workflow` and `medtl.run`): it may import every other layer.
"""

from medtl.studies.label_fractions import check_label_fractions, fraction_key, nested_label_subsets
from medtl.studies.transfer_benefit import ARMS, DEFAULT_FRACTIONS, run_transfer_benefit, study_arms
from medtl.studies.transfer_summary import render_section, report_mapping, summarise

__all__ = [
    "ARMS",
    "DEFAULT_FRACTIONS",
    "check_label_fractions",
    "fraction_key",
    "nested_label_subsets",
    "render_section",
    "report_mapping",
    "run_transfer_benefit",
    "study_arms",
    "summarise",
]
