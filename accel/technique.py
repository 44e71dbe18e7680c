"""The registry record of a technique: everything the library and the front ends need to know about it.

A technique is one folder (``accel/cache``, ``accel/tokens``, ...) whose ``record.py`` defines one
`Technique`: its `Config` section, its config class and preset table, the module that applies it,
where it goes in the application order, and the knobs that ``accel bench --sweep`` and ``accel tune``
try. `accel.config.TECHNIQUES` lists the records; `Config`, `accel.apply`, the presets, the config-file
layering, the web app's knobs, the sweeps and the tuner all iterate that one list.

Records are plain data and import nothing heavy: the apply function is named by its module
(imported when a config turns the technique on), so ``import accel`` and ``accel --help`` load no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, eq=False)
class Knob:
    """One swept field of a technique: the rows ``accel bench --sweep SECTION`` and ``accel tune`` try.

    Args:
        field: the field of the technique's config that the rows vary.
        values: its values, mildest first: a search stops a knob at its first row that misses the floor.
        label: each row's label, a format string over the row's fields
            (``"cache deepcache interval {interval:g}"``).
        fixed: the other fields every row of this knob sets.
        from_preset: fields read from the family's ``balanced`` setting of this technique
            (token reduction's ``method``: merge or prune, as the family's presets choose).
        kinds: the denoiser kinds (``"unet"``, ``"dit"``) the knob is for; empty is every kind.
        video_only: the knob is for video families only.
        group: the search group: a search stops each group at its first failure. Empty means the
            technique's section.
        calibrated: `accel tune` replaces ``values`` with values read off the user's own prompts.
    """

    field: str
    values: tuple
    label: str
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    from_preset: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    video_only: bool = False
    group: str = ""
    calibrated: bool = False

    def applies_to(self, kind: str, video: bool) -> bool:
        """Whether the knob is for a denoiser of ``kind`` in a family that is (or is not) ``video``.

        Args:
            kind: ``"unet"`` or ``"dit"`` (`accel.families.Family.kind`).
            video: whether the family makes video.

        Returns:
            True when the knob's rows apply.
        """
        return (not self.kinds or kind in self.kinds) and (video or not self.video_only)

    def rows(self, preset_fields: Mapping[str, Any] | None = None, values=None) -> list[tuple[str, dict]]:
        """The knob's rows as ``(label, section fields)``, mildest first.

        Args:
            preset_fields: the family's ``balanced`` fields of this technique; those named in
                ``from_preset`` are copied into every row.
            values: replaces ``values`` (a calibrated grid); None keeps them.

        Returns:
            One ``(label, fields)`` pair per value.
        """
        inherited = {k: (preset_fields or {})[k] for k in self.from_preset}
        out = []
        for v in self.values if values is None else values:
            fields = {**self.fixed, **inherited, self.field: v}
            out.append((self.label.format(**fields), fields))
        return out


@dataclass(frozen=True, eq=False)
class Technique:
    """One technique, as the registry knows it.

    Args:
        section: its `accel.Config` field and config-file table (``"cache"``).
        config: its config class (an `accel.config_base.ConfigBase` subclass with ``section`` set).
        presets: its preset table: ``{preset: {family or "*": fields}}``; a preset it does not name,
            or a family the preset maps to None, leaves it off.
        module: the module whose ``apply_technique(target, config) -> handle`` installs it.
        order: its place when `accel.apply` installs techniques, lowest first (a later one wraps
            the earlier ones).
        help: one line for the `Config` field.
        sweep: its knobs for ``accel bench --sweep`` and ``accel tune``.
        tuned: ``accel tune`` screens its knobs and writes its section into the tuned file.
        web: the web app shows its fields as controls.
        paths: fields holding a path, which a config file gives relative to its own folder.
    """

    section: str
    config: type
    presets: Mapping[str, Mapping[str, Any]]
    module: str
    order: int
    help: str
    sweep: tuple[Knob, ...] = ()
    tuned: bool = False
    web: bool = True
    paths: tuple[str, ...] = ()

    def preset_fields(self, name: str, family: str | None = None) -> dict | None:
        """The technique's fields for preset ``name`` on ``family``; None when the preset leaves it off.

        Args:
            name: a preset name.
            family: a key of `accel.families.FAMILIES`, or None for the ``"*"`` entry.

        Returns:
            A copy of the fields, or None.
        """
        per_family = self.presets.get(name, {})
        fields = per_family.get(family, per_family.get("*")) if family else per_family.get("*")
        return dict(fields) if fields else None
