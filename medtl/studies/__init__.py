"""Studies built on the workflow: several trainings of one workflow, compared and recorded together.

Built on the orchestration layer (`medtl.workflow`): it may import every other layer; only `medtl.cli` imports it.
"""

from medtl.studies.label_fractions import check_label_fractions, fraction_key, nested_label_subsets
from medtl.studies.summaries import render_section, report_mapping, summarise
from medtl.studies.transfer_benefit import ARMS, DEFAULT_FRACTIONS, run_transfer_benefit, study_arms

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
