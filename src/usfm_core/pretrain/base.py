"""What every pretraining method shares with the trainer.

The trainer optimises ``method.student`` (wrapped in DDP when distributed) and calls
``training_step``, ``before_optimizer_step``, ``after_step`` and ``export_backbone``;
:class:`PretrainMethod` gives the plumbing common to OpenUS, iBOT, MAE and JEPA.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class PretrainMethod(nn.Module):
    """Base of the methods: student runner, AdamW parameter groups, no-op step hooks.

    Subclasses set ``self.student`` (the trained module) and implement ``training_step`` and
    ``export_backbone``; OpenUS overrides the hooks for its EMA teacher.
    """

    student: nn.Module
    _student_runner: nn.Module | None = None

    def set_student_runner(self, runner: nn.Module | None) -> None:
        """Run the student through ``runner`` (e.g. its DDP wrapper).

        Stored outside the module tree so state_dict keys stay unchanged.
        """
        object.__setattr__(self, "_student_runner", runner)

    @property
    def runner(self) -> nn.Module:
        """The module to call for the student's forward: its DDP wrapper if set, else it."""
        return self._student_runner if self._student_runner is not None else self.student

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups over the student: weights with decay; biases, norms, tokens (≤ 1-D)
        without."""
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
        ]

    def before_optimizer_step(self, step: int) -> None:
        """Hook before ``optimizer.step()`` (e.g. freezing the last layer); none by default."""

    def after_step(self, step: int) -> None:
        """Hook after ``optimizer.step()`` (e.g. the teacher EMA); none by default."""
