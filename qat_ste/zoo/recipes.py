"""The training recipes of the STE paper's experiments ([P1] section 5), loaded from JSON.

The numbers live in ``recipes.json`` next to this module (package data, installed with qat_ste;
one place to read and edit them); this module turns that file into typed, validated objects:

    from qat_ste.zoo.recipes import load_recipes
    recipes = load_recipes()
    recipes.nets["resnet20"].quant            # Schedule(epochs=200, batch_size=128, lr=0.01, ...)
    recipes.paper_result("vgg11", 2, "relu")   # PaperResult(train_loss=0.1, val_accuracy_pct=88.69)
    recipes.nets["lenet5"].quant.scaled(0.1)   # 5 epochs, milestones (2, 4)

``Schedule.to_train_kwargs()`` gives the matching ``qat_ste.train.TrainConfig`` fields.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import QatSteError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "RECIPES_FORMAT",
    "default_recipes_path",
    "Schedule",
    "NetRecipe",
    "Phase",
    "InstabilityRun",
    "PaperResult",
    "Recipes",
    "load_recipes",
    "parse_recipes",
]

RECIPES_FORMAT = "qat_ste.recipes/1"
_SCHEDULE_KINDS = ("multistep", "cosine", "constant")
_OPTIMIZERS = ("sgd", "adamw")
_DATASETS = ("mnist", "cifar10")


def default_recipes_path() -> Traversable:
    """The recipes shipped with the package (``qat_ste/zoo/recipes.json``, found through
    ``importlib.resources``, so it works from a checkout, an installed wheel or a zip)."""
    return files(__package__).joinpath("recipes.json")


@dataclass(frozen=True)
class Schedule:
    """One optimisation schedule: SGD (or AdamW) with a per-epoch learning-rate schedule."""

    epochs: int
    batch_size: int
    lr: float
    schedule: str = "multistep"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise QatSteError(f"schedule {name}={value!r} must be a positive integer", f"fix {name} in the recipe")
        for name in ("lr", "gamma", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise QatSteError(f"schedule {name}={value!r} must be a number >= 0", f"fix {name} in the recipe")
        if self.lr <= 0:
            raise QatSteError(f"schedule lr={self.lr} must be > 0", "fix lr in the recipe")
        if self.schedule not in _SCHEDULE_KINDS:
            raise QatSteError(f"unknown schedule {self.schedule!r}", f"use one of {', '.join(_SCHEDULE_KINDS)}")
        if self.optimizer not in _OPTIMIZERS:
            raise QatSteError(f"unknown optimizer {self.optimizer!r}", f"use one of {', '.join(_OPTIMIZERS)}")
        milestones = tuple(int(m) for m in self.milestones)
        if list(milestones) != sorted(set(milestones)) or any(not 1 <= m < self.epochs for m in milestones):
            raise QatSteError(
                f"milestones {milestones} must be increasing epochs in 1..{self.epochs - 1}",
                "fix milestones in the recipe",
            )
        object.__setattr__(self, "milestones", milestones)

    def scaled(self, factor: float) -> Schedule:
        """The same schedule with every epoch count multiplied by ``factor`` (rounded, at least one
        epoch); milestones scale alike and those that leave no epoch after them are dropped."""
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            raise QatSteError(f"epoch scale {factor!r} must be a number > 0", "use e.g. 0.1 for a tenth of the epochs")
        epochs = max(1, int(round(self.epochs * factor)))
        milestones = sorted({int(round(m * factor)) for m in self.milestones})
        return replace(self, epochs=epochs, milestones=tuple(m for m in milestones if 1 <= m < epochs))

    def to_train_kwargs(self) -> dict[str, Any]:
        """The ``qat_ste.train.TrainConfig`` fields this schedule sets."""
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": float(self.lr),
            "schedule": self.schedule,
            "milestones": self.milestones if self.schedule == "multistep" else None,
            "gamma": float(self.gamma),
            "optimizer": self.optimizer,
            "momentum": float(self.momentum),
            "weight_decay": float(self.weight_decay),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON)."""
        out = self.to_train_kwargs()
        out["milestones"] = list(self.milestones)
        return out


@dataclass(frozen=True)
class NetRecipe:
    """One network: its data set in the paper, input size, augmentation, and the float
    pre-training and quantized training schedules."""

    net: str
    dataset: str
    image_size: int
    augment: bool
    pretrain: Schedule  # float pre-training ("float" in the JSON)
    quant: Schedule


@dataclass(frozen=True)
class Phase:
    """One stage of an instability run: a label and its schedule."""

    label: str
    schedule: Schedule
    is_normal_schedule: bool = False


@dataclass(frozen=True)
class InstabilityRun:
    """Retrain quantized weights trained with ``from_ste`` using ``ste`` instead ([P1] section 5)."""

    name: str
    net: str
    bits: int
    from_ste: str
    ste: str
    role: str  # "restart" (a run of [P1]) or "control"
    phases: tuple[Phase, ...]
    claim: str = ""


@dataclass(frozen=True)
class PaperResult:
    """One cell of [P1] Table 1."""

    train_loss: float
    val_accuracy_pct: float


@dataclass(frozen=True)
class Recipes:
    """Everything in ``recipes.json``, validated."""

    nets: Mapping[str, NetRecipe]
    grid_nets: tuple[str, ...]
    grid_bits: tuple[int, ...]
    grid_stes: tuple[str, ...]
    alpha_mode: str  # how the steps are trained (fixed in [P1])
    rounding: str
    bn_affine: bool
    paper_table1: Mapping[tuple[str, int, str], PaperResult]
    instability: tuple[InstabilityRun, ...]
    open_choices: Mapping[str, str]
    source: str = ""

    @property
    def alpha(self) -> str:
        """Deprecated alias of ``alpha_mode``."""
        warnings.warn("Recipes.alpha is deprecated; use Recipes.alpha_mode", DeprecationWarning, stacklevel=2)
        return self.alpha_mode

    def paper_result(self, net: str, bits: int, ste: str) -> PaperResult | None:
        """[P1] Table 1's numbers for one cell, or None if the paper has none."""
        return self.paper_table1.get((net, int(bits), ste))

    def quant_options(self, bits: int) -> dict[str, Any]:
        """``qat_ste.quantize`` keyword arguments of the recipes' quantized ReLU at ``bits``: the step
        mode and rounding; with ``"rounding": "paper_ceil"`` ceil rounding and the authors' constant
        steps (2 and 4 bits) instead of the MSE-optimal ceil steps."""
        options: dict[str, Any] = {"alpha_mode": self.alpha_mode, "rounding": self.rounding}
        if self.rounding == "paper_ceil":
            from ..quantizer.alpha import fixed_step

            options.update(rounding="ceil", step_init=fixed_step(int(bits), "paper_ceil"))
        return options

    def grid_cells(self) -> list[tuple[str, int, str]]:
        """The full Table 1 grid as (net, bits, ste), in the paper's order."""
        return [(n, b, s) for n in self.grid_nets for b in self.grid_bits for s in self.grid_stes]


def _need(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        raise QatSteError(f"recipes: {where} lacks {key!r}", "compare with the recipes.json shipped in qat_ste/zoo")
    return mapping[key]


def _schedule(values: Any, where: str) -> Schedule:
    if not isinstance(values, Mapping):
        raise QatSteError(f"recipes: {where} must be an object of schedule fields",
                          "see the recipes.json shipped in qat_ste/zoo")
    known = set(Schedule.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise QatSteError(f"recipes: {where} has unknown field(s) {', '.join(unknown)}",
                          f"schedule fields are: {', '.join(sorted(known))}")
    args = dict(values)
    args["milestones"] = tuple(args.get("milestones", ()))
    return Schedule(**args)


def _alpha_mode_key(quant: Any) -> str:
    """``alpha_mode``, or ``alpha`` in recipe files written before the rename."""
    old = isinstance(quant, Mapping) and "alpha" in quant and "alpha_mode" not in quant
    return "alpha" if old else "alpha_mode"


def parse_recipes(data: Mapping[str, Any]) -> Recipes:
    """Validate the parsed JSON of a recipes file and build :class:`Recipes`."""
    if _need(data, "format", "the file") != RECIPES_FORMAT:
        raise QatSteError(f"recipes format is {data.get('format')!r}, expected {RECIPES_FORMAT!r}",
                          "use a recipes file written for this version of qat_ste")
    quant = _need(data, "quantization", "the file")
    nets: dict[str, NetRecipe] = {}
    for name, entry in _need(data, "nets", "the file").items():
        dataset = _need(entry, "dataset", f"nets.{name}")
        if dataset not in _DATASETS:
            raise QatSteError(f"recipes: nets.{name}.dataset {dataset!r} is unknown",
                              f"use one of {', '.join(_DATASETS)}")
        nets[name] = NetRecipe(
            net=name,
            dataset=dataset,
            image_size=int(_need(entry, "image_size", f"nets.{name}")),
            augment=bool(_need(entry, "augment", f"nets.{name}")),
            pretrain=_schedule(_need(entry, "float", f"nets.{name}"), f"nets.{name}.float"),
            quant=_schedule(_need(entry, "quant", f"nets.{name}"), f"nets.{name}.quant"),
        )
    grid = _need(data, "grid", "the file")
    grid_nets = tuple(_need(grid, "nets", "grid"))
    missing = [n for n in grid_nets if n not in nets]
    if missing:
        raise QatSteError(f"recipes: grid nets {missing} have no entry under nets", "add their recipes")
    table: dict[tuple[str, int, str], PaperResult] = {}
    for net, by_bits in _need(data, "paper_table1", "the file").items():
        for bits, by_ste in by_bits.items():
            for ste, (loss, accuracy) in by_ste.items():
                table[(net, int(bits), ste)] = PaperResult(float(loss), float(accuracy))
    runs = []
    for entry in data.get("instability", []):
        name = _need(entry, "name", "an instability run")
        net = _need(entry, "net", name)
        if net not in nets:
            raise QatSteError(f"recipes: instability run {name} uses unknown net {net!r}", "add its recipe under nets")
        phases = []
        for i, phase in enumerate(_need(entry, "phases", name)):
            schedule = _need(phase, "schedule", f"{name} phase {i}")
            normal = schedule == "quant"
            phases.append(Phase(
                label=str(_need(phase, "label", f"{name} phase {i}")),
                schedule=nets[net].quant if normal else _schedule(schedule, f"{name} phase {i}"),
                is_normal_schedule=normal,
            ))
        if not phases:
            raise QatSteError(f"recipes: instability run {name} has no phases", "give it at least one phase")
        runs.append(InstabilityRun(
            name=name, net=net, bits=int(_need(entry, "bits", name)), from_ste=_need(entry, "from_ste", name),
            ste=_need(entry, "ste", name), role=str(entry.get("role", "restart")), phases=tuple(phases),
            claim=str(entry.get("claim", "")),
        ))
    return Recipes(
        nets=nets,
        grid_nets=grid_nets,
        grid_bits=tuple(int(b) for b in _need(grid, "bits", "grid")),
        grid_stes=tuple(_need(grid, "stes", "grid")),
        alpha_mode=str(_need(quant, _alpha_mode_key(quant), "quantization")),
        rounding=_rounding(quant),
        bn_affine=bool(_need(quant, "bn_affine", "quantization")),
        paper_table1=table,
        instability=tuple(runs),
        open_choices=dict(data.get("open_choices", {})),
        source=str(data.get("source", "")),
    )


def _rounding(quant: Mapping[str, Any]) -> str:
    """The recipes' rounding: nearest, ceil (MSE-optimal ceil steps) or paper_ceil (the authors' steps)."""
    rounding = str(quant.get("rounding", "nearest"))
    if rounding not in ("nearest", "ceil", "paper_ceil"):
        raise QatSteError(f"recipes: quantization rounding {rounding!r} is unknown",
                          "use nearest, ceil or paper_ceil (ceil with the authors' 2- and 4-bit steps)")
    return rounding


def load_recipes(path: str | Path | None = None) -> Recipes:
    """Read and validate a recipes file (default: the package's ``qat_ste/zoo/recipes.json``)."""
    source: Traversable | Path = default_recipes_path() if path is None else Path(path).expanduser()
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as error:
        fix = ("pass the path of an existing, readable recipes file" if path is not None
               else "reinstall qat_ste: its package data qat_ste/zoo/recipes.json is missing")
        raise QatSteError(f"cannot read the recipes file {source}: {error.strerror or error}", fix) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise QatSteError(f"{source} is not valid JSON: {error}", "fix the file (or check it out again)") from None
    return parse_recipes(data)
