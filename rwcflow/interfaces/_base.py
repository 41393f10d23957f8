"""What the rwcflow interfaces share: optional inputs read as ``None`` when unset, a one-file output."""

from __future__ import annotations

from nipype.interfaces.base import File, TraitedSpec, isdefined


def optional(value):
    """``value``, or ``None`` for an input left undefined."""
    return value if isdefined(value) else None


class OutFileSpec(TraitedSpec):
    """The output of an interface writing one file."""

    out = File(exists=True, desc="the output file")
