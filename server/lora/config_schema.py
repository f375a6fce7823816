"""What each adapter family's adapter_config.json may hold: types and ranges, checked before any value is used.

Strict JSON types (a string is not a number, a bool is not an int), finite numbers only, bounded sizes.
Unknown keys are ignored: real PEFT configs carry dozens of fields hotswap has no use for (task_type,
lora_dropout, fan_in_fan_out, revision, ...). `server.lora.peft.parse_adapter_config` validates a config
with one of these and turns the first violation into an `AdapterError` via `explain`.
"""
from __future__ import annotations

import reprlib
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, ValidationInfo

from server.validation import Text

# One entry per module of a large model fits (EVA writes such rank_pattern maps); each pattern is
# compiled once per adapter and tried against every adapted module, so the count bounds the work.
MAX_PATTERNS = 1024
MAX_PATTERN_CHARS = 1000
MAX_EXPERTS = 1024
MAX_META_LORAS = 1024


def _at_most_max_rank(r: int, info: ValidationInfo) -> int:
    max_rank = (info.context or {}).get("max_rank")
    if max_rank is not None and r > max_rank:
        raise ValueError(f"rank {r} exceeds --max-lora-rank {max_rank}")
    return r


Rank = Annotated[int, Field(ge=1), AfterValidator(_at_most_max_rank)]
# A PEFT LoRA's `r` and `rank_pattern` are defaults the tensors may not all use: the ranks the tensors
# actually have are what --max-lora-rank bounds (the parser checks them).
DeclaredRank = Annotated[int, Field(ge=1)]
Name = Annotated[Text, StringConstraints(max_length=MAX_PATTERN_CHARS)]  # a module name or a regex over them
Names = Annotated[list[Name], Field(max_length=MAX_PATTERNS)]
Tag = Annotated[Text, StringConstraints(max_length=64)]
RANK = "an integer between 1 and --max-lora-rank"

_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 120


def brief(value: object) -> str:
    """repr(value), cut short: what an upload holds goes into error messages, bounded."""
    return _BRIEF.repr(value)


class _Config(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


class FamilyTag(_Config):
    """What `detect_family` reads."""

    peft_type: Tag = Field("LORA", description="a string such as 'LORA'")
    hotswap_family: Tag | None = Field(None, description="a string naming a hotswap adapter family")
    use_dora: bool | None = Field(None, description="true or false")

    def names(self, family: str, peft_type: str) -> bool:
        """An explicit `hotswap_family` decides; else the PEFT type does."""
        return self.hotswap_family == family if self.hotswap_family is not None else self.peft_type == peft_type


class LoraConfig(_Config):
    """PEFT LoRA (`LoraConfig.save_pretrained`). Refusals of supported-but-unserved features are the parser's."""

    peft_type: Tag = Field("LORA", description="'LORA'")
    r: DeclaredRank = Field(8, description="a positive integer")
    lora_alpha: float = Field(8, description="a finite number")
    use_rslora: bool | None = Field(None, description="true or false")
    use_dora: bool | None = Field(None, description="true or false")
    bias: Tag = Field("none", description="'none'")
    modules_to_save: Names | None = Field(None, description="null or a list of module names")
    rank_pattern: Annotated[dict[Name, DeclaredRank], Field(max_length=MAX_PATTERNS)] | None = Field(
        None, description=f"an object mapping module-name regexes (at most {MAX_PATTERNS}, each at most {MAX_PATTERN_CHARS} characters) to positive integer ranks"
    )
    alpha_pattern: Annotated[dict[Name, float], Field(max_length=MAX_PATTERNS)] | None = Field(
        None, description=f"an object mapping module-name regexes (at most {MAX_PATTERNS}, each at most {MAX_PATTERN_CHARS} characters) to finite numbers"
    )
    target_modules: Names | Name | None = Field(None, description=f"a list of module names or one regex over module names (at most {MAX_PATTERN_CHARS} characters each)")


class MixLoraConfig(_Config):
    num_experts: int = Field(ge=1, le=MAX_EXPERTS, description=f"an integer between 1 and {MAX_EXPERTS}")
    top_k: int = Field(2, ge=1, description="an integer between 1 and num_experts")
    r: Rank = Field(description=RANK)
    lora_alpha: float | None = Field(None, description="a finite number (default: r)")
    act_fn: Literal["silu"] = Field("silu", description="'silu' (the base model's MLP activation)")
    routing: Literal["top_k", "sigmoid"] = Field("top_k", description="'top_k' or 'sigmoid'")
    global_gates: bool = Field(False, description="true or false (MoLE's per-sample global gates; needs routing 'sigmoid')")
    use_rslora: bool | None = Field(None, description="true or false")


class RecLoraConfig(_Config):
    r: Rank = Field(description=RANK)
    num_meta_loras: int = Field(ge=1, le=MAX_META_LORAS, description=f"an integer between 1 and {MAX_META_LORAS}")
    lora_alpha: float | None = Field(None, description="a finite number (default: r)")
    gate_temperature: float = Field(1.0, gt=0, description="a finite number > 0")
    target_modules: Names | None = Field(None, description=f"a list of module names (at most {MAX_PATTERN_CHARS} characters each)")


class S2FTConfig(_Config):
    """Types only: `parse_s2ft_config` checks the values, with messages the format's users know."""

    peft_type: Tag | None = Field(None, description="'S2FT'")
    hotswap_family: Tag | None = Field(None, description="'s2ft'")
    format_version: int | None = Field(None, description="an integer format version")
    target_modules: Names = Field(description="a list of module names")
    base_model_name_or_path: Text | None = Field(None, max_length=4096, description="a string")


def explain(e: ValidationError, schema: type[BaseModel], cfg: dict) -> str:
    """The first violation as 'FIELD must be WHAT: WHERE got VALUE (reason)'."""
    err = e.errors(include_url=False)[0]
    loc = err["loc"]
    if not loc:
        return f"the config is not valid ({err['msg']})"
    field = schema.model_fields.get(str(loc[0]))
    expected = field.description if field is not None and field.description else "valid"
    # Walk the input along the error's path: dict keys and list indexes name the bad entry; the other
    # steps pydantic puts in a path are union member tags, which mean nothing to the user.
    where, value = str(loc[0]), cfg.get(loc[0])
    for step in loc[1:]:
        if step == "[key]":
            where += " key"
        elif (isinstance(value, dict) and step in value) or (isinstance(value, list) and isinstance(step, int)):
            where, value = f"{where}[{brief(step)}]", value[step]
    got = "is missing" if err["type"] == "missing" else f"got {brief(err['input'])}"
    return f"{loc[0]} must be {expected}: {where} {got} ({err['msg']})"
