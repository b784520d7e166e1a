"""unimodal.config: YAML + overrides -> nested dataclasses, schemas from ``__init__`` signatures,
and one-line ConfigErrors naming the bad key or path."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pytest
from omegaconf import MISSING

from unimodal.config import ConfigError, load_config, schema_from_signature, to_yaml


def fake_register_to_config(init):
    """Stands in for diffusers' decorator: it wraps ``__init__`` with functools.wraps."""

    @functools.wraps(init)
    def inner(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.registered = True

    return inner


class TinyModel:
    @fake_register_to_config
    def __init__(
        self,
        dim: int = 8,
        widths: list[int] = [4, 8],  # noqa: B006  (a config default, as diffusers models write them)
        act: str = "gelu",
        dropout: float | None = None,
        *args,
        **kwargs,
    ):
        self.dim = dim


TinyModelConfig = schema_from_signature(TinyModel)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class RunConfig:
    name: str = "run"
    steps: int = 10
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@pytest.fixture
def run_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: tiny\nmodel:\n  dim: 16\n  widths: [2, 2, 2]\noptim:\n  lr: 0.01\n")
    return path


def test_schema_from_signature_mirrors_init():
    cfg = TinyModelConfig()
    assert (cfg.dim, cfg.widths, cfg.act, cfg.dropout) == (8, [4, 8], "gelu", None)
    assert [f.name for f in TinyModelConfig.__dataclass_fields__.values()] == [
        "dim",
        "widths",
        "act",
        "dropout",
    ]
    assert schema_from_signature(TinyModel) is TinyModelConfig  # cached
    other = TinyModelConfig()
    other.widths.append(99)  # list defaults are copied per instance
    assert TinyModelConfig().widths == [4, 8]
    model = TinyModel(**vars(TinyModelConfig(dim=3)))
    assert model.dim == 3 and model.registered


def test_derived_arguments_default_to_none():
    """``derived`` arguments follow from another part of the run: None in the schema unless given."""
    schema = schema_from_signature(TinyModel, derived=("widths",))
    assert schema is not TinyModelConfig and schema_from_signature(TinyModel, ("widths",)) is schema
    assert (schema().widths, schema().dim) == (None, 8)
    assert load_config(schema, None, ["widths=[1,2]"]).widths == [1, 2]
    with pytest.raises(ConfigError, match="bad value for config key 'widths'"):
        load_config(schema, None, ["widths=oops"])
    with pytest.raises(TypeError, match="no argument 'depth' to derive"):
        schema_from_signature(TinyModel, derived=("depth",))


def test_schema_needs_defaults():
    class NoDefault:
        def __init__(self, dim: int):
            pass

    with pytest.raises(TypeError, match="'dim' needs a default"):
        schema_from_signature(NoDefault)


def test_schema_from_diffusers_register_to_config():
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class DiffusersTiny(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, hidden: int = 4, layers: int = 2, norm_eps: float = 1e-6):
            super().__init__()

    schema = schema_from_signature(DiffusersTiny)
    cfg = load_config(schema, None, ["layers=3"])
    assert (cfg.hidden, cfg.layers, cfg.norm_eps) == (4, 3, 1e-6)
    assert DiffusersTiny(**vars(cfg)).config.layers == 3


def test_yaml_and_overrides_merge_into_nested_dataclasses(run_yaml):
    cfg = load_config(RunConfig, run_yaml, ["model.act=silu", "optim.lr=0.5", "steps=7", "model.dropout=0.1"])
    assert isinstance(cfg, RunConfig) and isinstance(cfg.model, TinyModelConfig)
    assert isinstance(cfg.optim, OptimConfig)
    assert cfg.name == "tiny" and cfg.steps == 7  # YAML, then override
    assert cfg.model == TinyModelConfig(dim=16, widths=[2, 2, 2], act="silu", dropout=0.1)
    assert cfg.optim.lr == 0.5 and cfg.optim.betas == [0.9, 0.95]  # override beats YAML; defaults kept
    assert load_config(RunConfig) == RunConfig()
    # to_yaml round-trips
    dumped = run_yaml.parent / "dumped.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(RunConfig, dumped) == cfg


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("model:\n  depth: 3\n", "unknown config key 'model.depth' in .*run.yaml"),
        ("steps: many\n", "bad value for config key 'steps' in .*run.yaml"),
        ("optim:\n  betas: [a, b]\n", r"bad value for config key 'optim.betas\[0\]'"),
        ("model: [1, 2\n", "cannot parse .*run.yaml"),
    ],
)
def test_yaml_errors_name_the_key(tmp_path, yaml_text, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.momentum=0.9", "unknown config key 'optim.momentum' in command-line overrides"),
        ("model.dim=wide", "bad value for config key 'model.dim' in command-line overrides"),
        ("steps", "override 'steps' is not of the form key=value"),
    ],
)
def test_override_errors_name_the_key(run_yaml, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, run_yaml, [override])


def test_missing_file_and_missing_required_key(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_config(RunConfig, missing)

    @dataclass
    class NeedsData:
        data_path: str = MISSING

    with pytest.raises(ConfigError, match="missing required config key 'data_path'"):
        load_config(NeedsData)
    assert load_config(NeedsData, None, ["data_path=/x"]).data_path == "/x"


def test_errors_are_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  depth: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, path)
    assert "\n" not in str(info.value)
