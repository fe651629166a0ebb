"""The learner registry: ``model.kind`` -> its Learner. Adding a learner is one module in
terabrain/learners/ and one line in ``LEARNERS``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional, Union

from pydantic import Field

from terabrain.learners.autoencoder import AutoencoderLearner
from terabrain.learners.base import Learner
from terabrain.learners.deep import DeepLearner
from terabrain.learners.kmeans import KMeansLearner
from terabrain.learners.rica import RICALearner
from terabrain.learners.topk_sae import TopKSAELearner

if TYPE_CHECKING:
    from terabrain.config.schema import ExperimentConfig

LEARNERS: dict[str, Learner] = {learner.kind: learner for learner in (
    RICALearner(),
    AutoencoderLearner(),
    DeepLearner(),
    TopKSAELearner(),
    KMeansLearner(),
)}
DEFAULT_KIND = "rica"

ModelConfig = Annotated[
    Union[tuple(learner.section for learner in LEARNERS.values())],  # type: ignore[misc]
    Field(discriminator="kind"),
]


def learner_of(config: "ExperimentConfig") -> Learner:
    return LEARNERS[config.model.kind]


def build_network(config: "ExperimentConfig", example_shape: tuple[int, ...]):
    """The experiment's network for examples of ``example_shape``, initialised from the
    experiment's seed (no parallelism)."""
    return learner_of(config).build(config, example_shape, config.seed)


def build_model(model, inputs: int, seed: Optional[int] = None):
    """A fully connected learner's module (rica, autoencoder) for rows of ``inputs`` values,
    from its ``model`` section alone."""
    return LEARNERS[model.kind].build_module(model, inputs, seed)
