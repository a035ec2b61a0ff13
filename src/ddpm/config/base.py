"""The base of every params section: a frozen pydantic model with one-line errors and a dict round-trip.

An invalid field raises :class:`ConfigError`, one line naming the key, the value and what is allowed.
This package imports no implementation (no torch), so a stage that validates params.yaml depends on the
schemas only.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

# Name used in error messages while ``Config.from_dict`` validates a section (e.g. "train").
_ERROR_PREFIX: ContextVar[str | None] = ContextVar("config_error_prefix", default=None)


class ConfigError(ValueError):
    """An invalid configuration value; the message is one line."""


def _where(error: Mapping[str, Any], prefix: str) -> str:
    """The dotted name of the key a pydantic error is about ('prefix.field'), or ``prefix``."""
    loc = ".".join(str(p) if isinstance(p, int) or str(p).isidentifier() else short_repr(p) for p in error["loc"])
    return f"{prefix}.{loc}" if loc else prefix


def _describe(error: Mapping[str, Any], model: type[BaseModel], prefix: str) -> str:
    """One clause for one pydantic error: 'prefix.field=value: what is allowed'."""
    where = _where(error, prefix)
    loc = where != prefix
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key; allowed keys: {', '.join(model.model_fields)}"
    msg = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}={short_repr(error['input'])}: {msg}" if loc else f"{where}: {msg}"


def short_repr(value: Any, limit: int = 80) -> str:
    """repr of ``value``, cut to ``limit`` characters (error messages stay one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Config(BaseModel):
    """Base of all configs: frozen, no unknown keys, one-line errors, dict round-trip."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise self.error(e, _ERROR_PREFIX.get() or type(self).__name__) from None

    @classmethod
    def error(cls, e: ValidationError, prefix: str) -> ConfigError:
        """Turn a pydantic ValidationError into a one-line ConfigError (unknown keys in one clause)."""
        errors = e.errors()
        unknown = [err for err in errors if err["type"] == "extra_forbidden"]
        clauses = [_describe(err, cls, prefix) for err in errors if err["type"] != "extra_forbidden"]
        if len(unknown) == 1:
            clauses.append(_describe(unknown[0], cls, prefix))
        elif unknown:
            keys = ", ".join(_where(err, prefix) for err in unknown)
            clauses.append(f"{keys}: unknown keys; allowed keys: {', '.join(cls.model_fields)}")
        return ConfigError("; ".join(clauses))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, prefix: str | None = None):
        """Validate a plain mapping (a params.yaml section); ``prefix`` names it in errors."""
        prefix = prefix or cls.__name__
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix}={short_repr(data)}: expected a mapping of keys to values")
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"{prefix}: keys must be names, got {short_repr(bad_keys)}")
        token = _ERROR_PREFIX.set(prefix)
        try:
            return cls(**data)
        finally:
            _ERROR_PREFIX.reset(token)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-compatible dict that ``from_dict`` accepts."""
        return self.model_dump(mode="json")

    def replace(self, **updates: Any):
        """A validated copy with ``updates`` applied; ``None`` values keep the current setting."""
        changed = {k: v for k, v in updates.items() if v is not None}
        return type(self).from_dict({**self.to_dict(), **changed}) if changed else self


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILE_MODES = ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # inductor's modes


def _compile_setting(value: Any) -> Any:
    if isinstance(value, bool) or value in COMPILE_BACKENDS or value in COMPILE_MODES:
        return value
    raise ValueError(
        f"allowed: false, true (inductor), a backend ({', '.join(COMPILE_BACKENDS)}) or an inductor mode "
        f"({', '.join(COMPILE_MODES)})"
    )


CompileSetting = Annotated[bool | Literal[COMPILE_BACKENDS + COMPILE_MODES], BeforeValidator(_compile_setting)]
"""A ``compile`` params key: false, true (the inductor backend), a torch.compile backend by name, or an inductor mode.

``eager`` and ``aot_eager`` trace the network with TorchDynamo (and AOTAutograd) and run the traced graph
without generating code: they check that a network compiles in seconds, where inductor takes a minute.
The modes are inductor's: ``reduce-overhead`` replays each compiled graph as a CUDA graph (one launch for all
of a step's kernels; a graph per input shape), ``max-autotune`` also times several kernels per operation
while compiling, ``max-autotune-no-cudagraphs`` does that without CUDA graphs. On a CPU there are no CUDA
graphs: the modes compile as inductor does.
"""
