"""Configuration at the edge: YAML + ``key=value`` overrides -> typed dataclasses.

Each module owns a dataclass (a diffusers model's ``@register_to_config`` ``__init__`` signature is
its dataclass: :func:`schema_from_signature` builds it). YAML files mirror those dataclasses 1:1.
OmegaConf appears only here: it validates the YAML and the command-line overrides against the
structured schema, and every failure becomes one :class:`ConfigError` line naming the key or the
path. Everything below the edge sees plain dataclasses.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


_SCHEMAS: dict[tuple[type, tuple[str, ...]], type] = {}


def schema_from_signature(cls: type, derived: tuple[str, ...] = ()) -> type:
    """A dataclass mirroring ``cls.__init__``'s keyword arguments (types from its annotations).

    Diffusers models register their ``__init__`` arguments as their config; this turns that
    signature into the schema that YAML ``model:`` sections are validated against.

    ``derived`` names arguments whose value follows from another part of the run (a VAE's
    vocabulary from its tokenizer, a prior's input channels from the VAE's latent dim): in the
    schema they are ``T | None`` with default None, so YAML does not repeat them; the code that
    builds the model fills them in and rejects a given value that disagrees.
    """
    key = (cls, tuple(derived))
    if key in _SCHEMAS:
        return _SCHEMAS[key]
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    hints = typing.get_type_hints(init)
    params = list(inspect.signature(init).parameters.items())[1:]
    unknown = sorted(set(derived) - {name for name, _ in params})
    if unknown:
        raise TypeError(f"{cls.__name__}.__init__ has no argument {unknown[0]!r} to derive")
    fields = []
    for name, param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is inspect.Parameter.empty:
            raise TypeError(f"{cls.__name__}.__init__ argument {name!r} needs a default to be configurable")
        default = param.default
        if name in derived:
            fields.append((name, hints.get(name, Any) | None, dataclasses.field(default=None)))
        elif isinstance(default, (list, dict)):
            factory = lambda d=default: copy.deepcopy(d)  # noqa: E731  (a fresh copy per instance)
            fields.append((name, hints.get(name, Any), dataclasses.field(default_factory=factory)))
        else:
            fields.append((name, hints.get(name, Any), dataclasses.field(default=default)))
    schema = dataclasses.make_dataclass(f"{cls.__name__}Config", fields)
    _SCHEMAS[key] = schema
    return schema


def _describe(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError) and key:
        return f"unknown config key '{key}' in {source}"
    if isinstance(err, ValidationError) and key:
        return f"bad value for config key '{key}' in {source}: {msg}"
    return f"invalid config in {source}: {msg}"


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | tuple = ()) -> T:
    """Merge ``schema`` defaults, then the YAML at ``path``, then ``key=value`` overrides.

    Returns an instance of ``schema`` (a dataclass). Raises :class:`ConfigError` on a missing
    file, an unknown key, a value of the wrong type, or a malformed override.
    """
    cfg = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise ConfigError(_describe(err, str(path))) from None
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, "command-line overrides")) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config key '{missing[0]}'")
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: Any) -> str:
    """The YAML text of a config dataclass (what a run saves beside its checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
