"""The orchestration layer: one home per step of a run.

| step | module |
|---|---|
| the workflow config (YAML, `--set`, validation) | `medtl.workflow.config` |
| checks before any work, the manifest, the task's rows | `medtl.workflow.prepare` |
| model, preprocessing, datasets, training | `medtl.workflow.train` |
| transfer methods (domain adaptation, multi-task, continual) | `medtl.workflow.methods` |
| predictions, metrics with CIs, the bias audit | `medtl.workflow.evaluate` |
| MLflow, the registry and the PHI checks around them | `medtl.workflow.record` |
| the audited evaluation report | `medtl.workflow.report` |
| `run_workflow`: the steps in order | `medtl.workflow.run` |
| the demo job on synthetic studies | `medtl.workflow.demo` |

Only this package imports every lower layer (data, models, engine, evaluation, tracking);
`medtl.studies` builds on it and `medtl.cli` calls both (docs/architecture.md). Importing the
package, and `medtl.workflow.config`, loads no torch: the step modules are imported by name.
"""

from medtl.workflow.config import WorkflowConfig, load_config

__all__ = ["WorkflowConfig", "load_config"]
