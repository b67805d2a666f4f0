"""The kinds of steps an arm's pipeline runs (one file each; see base.py)."""
from quantatlas.quant.steps.base import (Step, arm_reads_calibration, arm_seeded, arm_techniques, is_reference,
                                         later_fields, registry, steps_of)

__all__ = ["Step", "arm_reads_calibration", "arm_seeded", "arm_techniques", "is_reference", "later_fields",
           "registry", "steps_of"]
