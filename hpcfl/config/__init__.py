"""Typed, validated configuration.

YAML goes through one loader (``1e-3`` is a float, duplicate keys are errors),
is merged with ``--set key.path=value`` overrides in one place
(:func:`load_config`), and becomes a tree of frozen dataclasses. Unknown keys
are rejected with a "did you mean"; every error names the file and key path.

The package, by job (docs/architecture.md):

- :mod:`.loader`: the hardened YAML loader (size, depth and alias limits, duplicate keys);
- :mod:`hpcfl.fields`: how a key is declared (:func:`setting`) and the "did you mean" of errors (outside this
  package, so that a section beside its owner imports it without loading the schema);
- :mod:`.schema`: the sections and :class:`Config`; a task's or the tile pipeline's section lives beside its
  owner (hpcfl/tasks/dino/config.py, hpcfl/tasks/segment/config.py, hpcfl/tasks/mil_config.py,
  hpcfl/wsi/config.py) and is registered in the schema;
- :mod:`.convert`: dict -> dataclasses (types, bounds, unknown keys) and back;
- :mod:`.checks`: cross-field checks (and each built-in task's, registered in ``TASK_CHECKS``);
- :mod:`.overrides`: ``--set`` and the migration of keys that moved; :mod:`.load`: the one merge;
- :mod:`.trajectory`: the resume hash; :mod:`.reference`: the README's config reference.

Every name is re-exported here: import from ``hpcfl.config``.
"""
from __future__ import annotations

from ..tasks.dino.config import DinoConfig, DinoCropsConfig, DinoEvalConfig
from ..tasks.mil_config import MilConfig
from ..tasks.segment.config import SegmentConfig, VolumesConfig, VolumeSynthConfig
from ..wsi.config import CacheConfig, SmartCacheConfig, SynthConfig, TilesConfig
from .checks import ROBUST, TASK_CHECKS, validate
from .convert import MAX_SITES, build, check_arg, dump_yaml, expand_sites, to_dict
from ..fields import join, setting, suggest
from .load import from_dict, load_config
from .loader import MAX_CONFIG_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, parse_yaml, read_config_text
from .overrides import apply_override, migrate
from .reference import reference, reference_markdown
from .schema import (STRATEGIES, CheckpointConfig, ClusterConfig, Config, DataConfig, DebugConfig, DPConfig,
                     EvalConfig, FailureInjection, FaultConfig, FeatureBagsConfig, FLConfig, LaunchConfig,
                     MlflowConfig, ModelConfig, ObserveConfig, PercentileConfig, PipelineConfig, PrivacyConfig,
                     RobustConfig, RoundHold, RunConfig, SamplingConfig, SecAggConfig, ServerOptConfig,
                     SiteBackendConfig, SiteConfig, SiteOverrides, StragglerConfig, TrainConfig)
from .trajectory import config_hash, trajectory_dict

__all__ = [
    "MAX_CONFIG_BYTES", "MAX_SITES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "ROBUST", "STRATEGIES", "TASK_CHECKS",
    "CacheConfig", "CheckpointConfig", "ClusterConfig", "Config", "DataConfig", "DebugConfig", "DinoConfig",
    "DinoCropsConfig", "DinoEvalConfig", "DPConfig", "EvalConfig", "FailureInjection", "FaultConfig",
    "FeatureBagsConfig", "FLConfig", "LaunchConfig", "MilConfig", "MlflowConfig", "ModelConfig", "ObserveConfig",
    "PercentileConfig", "PipelineConfig", "PrivacyConfig", "RobustConfig", "RoundHold", "RunConfig",
    "SamplingConfig", "SecAggConfig", "SegmentConfig", "ServerOptConfig", "SiteBackendConfig", "SiteConfig",
    "SiteOverrides", "SmartCacheConfig", "StragglerConfig", "SynthConfig", "TilesConfig", "TrainConfig",
    "VolumeSynthConfig", "VolumesConfig",
    "apply_override", "build", "check_arg", "config_hash", "dump_yaml", "expand_sites", "from_dict", "join",
    "load_config", "migrate", "parse_yaml", "read_config_text", "reference", "reference_markdown", "setting",
    "suggest", "to_dict", "trajectory_dict", "validate",
]
