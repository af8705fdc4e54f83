"""The record of one model's tensors filled from another's: what ``condcomp upcycle`` prints.

A :class:`Transplant` holds the source's state dict and the target's (the target model's own
tensors, written in place), and notes, tensor by tensor, what each target tensor got: a source
tensor (copied, split, stacked or scaled), a value set by a rule (an identity, a zero), or
nothing (its own fresh init). What is left unread of the source, and why the target does not
compute what the source computes, are part of the record too.
"""

from __future__ import annotations

import torch

from condcomp.errors import ConfigError


class Transplant:
    """Writes into the target's tensors and keeps the record."""

    def __init__(self, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
        self.source, self.target = source, target
        self.mapped: dict[str, str] = {}  # target name -> where its value came from
        self.set_by_rule: dict[str, str] = {}  # target name -> the value set and why
        self.used: set[str] = set()
        # Why the function differs from the source's (in training only), each reason with
        # the modules it holds for: one line per reason, however many layers it covers.
        self.changes: dict[str, list[str]] = {}
        self.training_changes: dict[str, list[str]] = {}

    def note(self, where: str, why: str, training_only: bool = False) -> None:
        """Record that the module ``where`` does not compute what the source's does, and why."""
        notes = self.training_changes if training_only else self.changes
        notes.setdefault(why, []).append(where)

    def read(self, name: str) -> torch.Tensor:
        """The source tensor ``name``, marked as used."""
        self.used.add(name)
        return self.source[name]

    def write(self, name: str, value: torch.Tensor, how: str) -> None:
        """Fill the target tensor ``name`` from source tensors (``how`` says which, and how)."""
        self._copy(name, value)
        self.mapped[name] = how

    def set(self, name: str, value: torch.Tensor, why: str) -> None:
        """Fill the target tensor ``name`` with a value no source tensor holds."""
        self._copy(name, value)
        self.set_by_rule[name] = why

    def _copy(self, name: str, value: torch.Tensor) -> None:
        tensor = self.target[name]
        if tensor.shape != value.shape:
            raise ConfigError(f"{name} is {list(tensor.shape)} in the target but the source "
                              f"gives {list(value.shape)}; the target's dense skeleton must be "
                              "the source's")
        with torch.no_grad():
            tensor.copy_(value)

    def copy_by_name(self) -> None:
        """Every target tensor not yet filled whose name the source holds, as it is."""
        for name in self.target:
            if name in self.source and name not in self.mapped and name not in self.set_by_rule:
                self.write(name, self.read(name), "copied")

    def fresh(self) -> list[str]:
        """Target tensors left at their own initialisation."""
        return [name for name in self.target
                if name not in self.mapped and name not in self.set_by_rule]

    def unused(self) -> list[str]:
        """Source tensors that went into no target tensor."""
        return [name for name in self.source if name not in self.used]
