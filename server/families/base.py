"""What an adapter family is: the one seam every family implements, and the engine consults.

A family is one module under `server/families/` that defines `FAMILY` (and `SPACE` if it brings a
pool space of its own). The registry (`server.families`) finds every such module; detection, the
adapter manager, the model runner and the model ask the registry, never a family's name.

- `Family` reads adapter files: `claims(tag)` says whether a config is one of its adapters,
  `parse(files, name, ctx)` turns the files into weights.
- Weights (`AdapterWeights`) say where they go on the device: the pool space, the units they take,
  the modules they write and how (`write_into`), and which modules the step plan must visit.
- A pool space (`PoolSpace`) names the pools it keeps per module and applies itself inside each
  linear layer with the step's plan for that module.
- A family whose adapters need more than the plans during a step (routed experts) gives a
  `step_hooks` per step (`StepHook`: its hook points in the decoder layer, and per-sequence state that
  lives across steps through `SeqRows`); a family whose adapters are made per user (RecLoRA) is `per_user` and its
  weights `personalize(state)` into placeable weights.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from server.lora.config_schema import FamilyTag
from server.models.config import ModelConfig

if TYPE_CHECKING:
    from kernels import LoraPlan


@dataclass(frozen=True, slots=True)
class ParseContext:
    """What a family's parser may consult: the base model's shapes, the serving dtype, the rank limit,
    and (for families whose math involves them, like DoRA's norms) the base weights themselves."""

    model_cfg: ModelConfig
    dtype: torch.dtype
    max_rank: int
    # (layer, module) -> the module's dense base weight (d_out, d_in) in float32, dequantized if the
    # base is quantized; None where the parser runs without a model (tools, tests of the format).
    base_weight: Callable[[int, str], torch.Tensor] | None = None


class AdapterWeights(Protocol):
    """One parsed adapter, as the adapter manager places it in the device pools."""

    name: str
    family: str  # its Family's name
    space: str  # the pool space its units live in

    @property
    def units(self) -> int: ...  # units it owns in every pool of its space: [start, start + units)

    @property
    def plan_units(self) -> int: ...  # of those, the units the step plan drives from `start`

    @property
    def modules(self) -> Iterable[tuple[int, str]]: ...  # (layer, module) pairs it writes into

    @property
    def targets(self) -> frozenset[str]: ...  # module names the step plan must visit for it

    @property
    def num_bytes(self) -> int: ...

    def write_into(self, pools: dict[str, torch.Tensor], layer: int, module: str, start: int, dtype: torch.dtype) -> None: ...

    def module_units(self) -> dict[str, int]: ...  # module -> units (rank, entries), the largest over layers: for manifests

    # Families with step hooks also give `on_device(device) -> weights`: the weights whose tensors the
    # hooks read every step (routers, gates), on the engine's device (the adapter manager keeps those).


class PoolSpace(Protocol):
    """Device pools of one kind, one set per logical module, indexed by unit; applied inside the linear."""

    name: str

    def pools(self, d_in: int, d_out: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """pool name -> (shape of one unit, dtype)."""
        ...

    def has_pools(self, pools: dict[str, torch.Tensor]) -> bool:
        """Whether a module's pools include this space's (they exist once an adapter of the space targets it)."""
        ...

    def apply(self, out: torch.Tensor, x: torch.Tensor, slot: Any, plan: "LoraPlan", linear: Any) -> None:
        """Add this space's deltas for the plan's segments into `out`, the output slice of `slot` (an
        AdapterSlot: its pools and where it sits in `linear`'s output) for the input x."""
        ...


@dataclass(frozen=True, slots=True)
class SeqRows:
    """One sequence's tokens in a step, as a step hook sees them: rows [start, end) of the flat batch
    hold the sequence's tokens at positions [pos, pos + end - start)."""

    start: int
    end: int
    pos: int
    # The family's state for this sequence, kept by the model runner across steps (the same dict every
    # step) and dropped when the sequence leaves the running batch: finished, aborted, failed or preempted
    # (a preempted sequence is recomputed from position 0 with a fresh, empty dict). Hooks change it
    # only in end_step, so a step that fails leaves it as it was.
    state: dict


@dataclass(frozen=True, slots=True)
class HookedAdapter:
    """A resident adapter of a family with step hooks, in one step: its tokens' rows in the flat batch
    (ascending) and the same rows per sequence."""

    entry: Any  # the manager's resident entry (weights, row_start, ...)
    tokens: torch.Tensor
    seqs: list[SeqRows]


class StepHook(Protocol):
    """Per-step work of one or more adapters beyond the plans. Every decoder layer calls each hook's
    `before_down`, then (after the down projection) its `after_mlp`; the model runner calls `end_step`
    once the step has completed. Subclass it to inherit no-op defaults for the points a hook does not use.

    Shapes: T tokens in the flat batch, d = hidden size, i = intermediate size; the hook's own tokens
    are the rows of the adapters it was made for (Family.step_hooks)."""

    def before_down(self, layer: Any, h: torch.Tensor, gate_up: torch.Tensor, act: torch.Tensor) -> None:
        """h: the MLP's input (T, d); gate_up: the base gate/up GEMMs (T, 2i); act: silu(gate) ⊙ up (T, i),
        about to enter the down projection — edit the hook's rows in place (the down GEMM, its bias and
        the step plans' down_proj deltas then apply to what is there)."""
        return None

    def after_mlp(self, layer: Any, h: torch.Tensor, gate_up: torch.Tensor, out: torch.Tensor) -> None:
        """h: the MLP's input (T, d); gate_up: the base gate/up GEMMs (T, 2i); out: the MLP's output (T, d), to edit in place."""
        return None

    def end_step(self) -> None:
        """The step's forward pass and sampling completed: commit per-sequence state (SeqRows.state)."""
        return None


@dataclass(frozen=True)
class Family:
    name: str  # as manifests and the upload API spell it
    claims: Callable[[FamilyTag], bool]  # is this config one of ours?
    parse: Callable[[dict[str, bytes], str, ParseContext], Any]  # files, adapter name -> weights (AdapterError if malformed)
    per_user: bool = False  # weights are a bank, made per user by `weights.personalize(state)`
    # the family's adapters in a step -> its hooks for the step (one per adapter, or one per group of
    # adapters it can serve with one set of ops), for families that route per step
    step_hooks: Callable[[list[HookedAdapter]], list[StepHook]] | None = None
