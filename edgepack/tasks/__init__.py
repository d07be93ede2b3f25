"""Tasks: declare what a model's outputs mean and gate every variant against fp32 in task terms.

A task (``task:`` in edgepack.yaml, ``edgepack optimize --task FILE``) names which outputs
are boxes, score maps, CTC logits, masks, embeddings, values or per-step decisions, and
how they decode. Each variant's outputs and the fp32 reference's are decoded alike and
compared (box recall/precision and mAP@0.5, mask IoU, decoded-string agreement and CER,
embedding cosine, max error, decision agreement); :mod:`edgepack.tasks.gates` gates them,
and every output the task does not cover is gated on its own.
"""

from .gates import check, output_failures, task_failures
from .kinds import KINDS, GateRule
from .measure import OutputStats, TaskRun
from .spec import (
           OUTPUT_GATES,
           TASK_GATE_KEYS,
           TaskSpec,
           load_task_file,
           task_from_dict,
           validate_task,
           validate_task_gates,
)

__all__ = ["KINDS", "OUTPUT_GATES", "TASK_GATE_KEYS", "GateRule", "OutputStats", "TaskRun", "TaskSpec", "check",
           "load_task_file", "output_failures", "task_failures", "task_from_dict", "validate_task", "validate_task_gates"]
