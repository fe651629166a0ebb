from terabrain.config.loader import load_experiment, to_yaml
from terabrain.config.schema import ExperimentConfig

__all__ = ["ExperimentConfig", "load_experiment", "to_yaml"]
