"""Fully connected autoencoders (Van Essen et al. 2015's LBANN networks, Coates et al.'s
sparse autoencoders): x -> act(W1 x + b1) -> W2 h + b2, tied (W2 = W1^T) or untied; hidden
units split across the model axis."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from terabrain.learners.hidden_units import HiddenUnitLearner, HiddenUnitSection
from terabrain.nn.autoencoder import Autoencoder


class AutoencoderModel(HiddenUnitSection):
    """Autoencoder: x -> act(W1 x + b1) -> dec(W2 h + b2)."""

    kind: Literal["autoencoder"] = Field(
        "autoencoder",
        description="The feature learner (terabrain.learners): rica, autoencoder, deep, kmeans.")
    tied: bool = Field(True, description="The decoder uses the encoder's W^T.")
    activation: Literal["sigmoid", "tanh", "relu", "identity"] = Field(
        "sigmoid", description="The hidden units' nonlinearity."
    )
    decoder_activation: Literal["identity", "sigmoid"] = Field(
        "identity", description="Nonlinearity of the reconstruction."
    )


class AutoencoderLearner(HiddenUnitLearner):
    kind, section = "autoencoder", AutoencoderModel
    objectives = ("reconstruction", "sparse_autoencoder")

    def check(self, config):
        super().check(config)
        if config.objective.kind == "sparse_autoencoder" and config.model.activation != "sigmoid":
            raise ValueError(
                "objective.kind sparse_autoencoder needs model.activation sigmoid "
                "(the KL target rho is a firing probability)"
            )

    def build_module(self, m, inputs, seed):
        return Autoencoder(inputs, m.hidden, tied=m.tied, activation=m.activation,
                           decoder_activation=m.decoder_activation, dropout=m.dropout, seed=seed)

    def gradient_copies(self, config, name):
        # One buffer per weight: the tied W's encoder and decoder contributions are summed
        # into it in place (terabrain.nn.shared_weight); an untied weight has one use.
        # Weight decay's term is autograd's own: a second W-sized contribution.
        decay = int(config.objective.weight_decay > 0)
        if name in ("encoder.weight", "decoder.weight"):
            return 1 + decay
        return 1

    def gradient_in_blocks(self, config, name):
        # The tied W's two products are written block by block into its one buffer; weight
        # decay would add a second contribution after them, so W is then reduced whole.
        return (config.model.tied and name == "encoder.weight"
                and config.objective.weight_decay == 0)

    def activation_values_per_row(self, config, inputs, hidden_local):
        values = super().activation_values_per_row(config, inputs, hidden_local)
        return values + (inputs if config.model.decoder_activation == "sigmoid" else 0)

    def summed_scalars(self, config, rows):
        # Weight decay and the KL term meet in one scalar loss.
        return int(config.objective.weight_decay > 0 or config.objective.kind == "sparse_autoencoder")

    def describe(self, config):
        return f"autoencoder with {config.model.hidden} hidden units"

    def plan_description(self, config, inputs):
        return (f"autoencoder {inputs:,} -> {config.model.hidden:,} -> {inputs:,} "
                f"({'tied' if config.model.tied else 'untied'})")
