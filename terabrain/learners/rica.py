"""RICA (Le et al. 2011, as in Ni et al. 2015, eq. 1): codes ``alpha W x``, reconstruction
``W^T h + b``, the rows of W kept at unit norm; hidden units split across the model axis."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from terabrain.learners.hidden_units import HiddenUnitLearner, HiddenUnitSection
from terabrain.nn.autoencoder import RICA


class RICAModel(HiddenUnitSection):
    """RICA: x -> alpha W x, reconstructed as W^T(alpha W x) + b, W's rows of unit norm."""

    kind: Literal["rica"] = Field(
        "rica", description="The feature learner (terabrain.learners): rica, autoencoder, deep, kmeans.")
    scale: Literal["learned", "fixed"] = Field(
        "learned", description="The codes' scale alpha: learned with W (Ni et al. 2015), or fixed "
        "at min(1, inputs / hidden), where unit rows forming a tight frame reconstruct. Fixed "
        "lets L-BFGS train very overcomplete layers (hidden >> inputs), where the learned "
        "scalar's curvature stalls the weights (docs/analysis.md).")


class RICALearner(HiddenUnitLearner):
    kind, section, objectives = "rica", RICAModel, ("rica",)
    normalisation_streams = 6  # row norms, divide, and their backward: passes over W per step

    def build_module(self, model, inputs, seed):
        return RICA(inputs, model.hidden, model.dropout, seed=seed,
                    learn_scale=model.scale == "learned")

    def gradient_copies(self, config, name):
        # The encoder, the decoder and the row normalisation all add into W's one gradient
        # buffer (terabrain.nn.shared_weight); no normalised copy of W is formed.
        return 1

    def gradient_in_blocks(self, config, name):
        return name == "weight"  # all of W's contributions are written block by block

    def summed_scalars(self, config, rows):
        return rows + 1  # each row's L1 over hidden units, and the gradient of alpha

    def describe(self, config):
        return f"rica with {config.model.hidden} hidden units"

    def plan_description(self, config, inputs):
        return f"rica {inputs:,} -> {config.model.hidden:,}"
