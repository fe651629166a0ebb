"""The work of one training step of a fully connected learner (RICA, the autoencoders) on one
rank, for `terabrain plan --profile` (terabrain.capacity.timing turns it into seconds).

Per closure evaluation, with b = batch / data rows, n inputs, h' = hidden / model local units:

- five matrix products: the encoder x W^T (b x h' x n), the decoder h W (b x n x h'), the
  codes' gradient g W^T (b x h' x n), and the two weight gradients h^T g and g_z^T x
  (h' x n x b each). The input needs no gradient.
- elementwise: about 18 fp32 values moved per input value of a row (bias, residual, square,
  sum and their gradients, each reading two operands and writing one) and 12 per hidden
  value (bias, nonlinearity, its gradient, bias gradient); over the weights, summing the
  partial gradients of a weight used k times (3 streams per extra copy) and one pass of the
  weight-decay term; RICA's row normalisation adds 6 passes over W.
- the optimizer: terabrain.capacity.work.optimizer_streams values per local parameter
  (fused on one rank; over DTensors SGD and Adagrad are not).
- collectives: on the model axis the forward all-reduce of the (b x n) partial
  reconstruction (and the summed scalars); on the data axis the gradient exchange
  (terabrain.capacity.work.gradient_exchange): with parallel.overlap one all-reduce per
  block of a weight whose gradient the module writes in blocks and per other tensor, during
  the backward pass, then one of the logged values; without it, after the backward pass.
- split over the model axis, each evaluation also pays DTensor's dispatch of its operations
  (``StepWork.sharded_evaluations``; the profile's ``sharded_evaluation_s``).
"""

from __future__ import annotations

from terabrain.capacity.costs import (
    FP32,
    evaluations_per_step,
    ring_all_gather,
    ring_all_reduce,
)
from terabrain.capacity.work import (
    Gemm,
    StepWork,
    Transfer,
    assemble_step,
)

VALUES_PER_INPUT = 18
VALUES_PER_HIDDEN = 12
STREAMS_PER_EXTRA_GRADIENT = 3


def hidden_unit_work(learner, config, inputs: int, params: list, logged: int):
    """(data ranks, model ranks, rows per replica) -> StepWork, for ``params`` as
    HiddenUnitLearner.parameters_of lists them."""
    hidden = config.model.hidden
    evaluations = evaluations_per_step(config.optimizer)
    normalisation = learner.normalisation_streams

    def work(data_ranks: int, model_ranks: int, rows: int) -> StepWork:
        local_hidden = -(-hidden // model_ranks)
        local_of = {p.name: -(-p.numel // model_ranks) if p.sharded else p.numel for p in params}
        local = sum(local_of.values())
        weight_values = sum(
            (STREAMS_PER_EXTRA_GRADIENT * (p.gradient_copies - 1) + 1) * local_of[p.name]
            for p in params)
        weight_values += normalisation * sum(local_of[p.name] for p in params if p.sharded)
        elementwise = FP32 * (rows * (VALUES_PER_INPUT * inputs + VALUES_PER_HIDDEN * local_hidden)
                              + weight_values)
        # Each weight matrix's first gradient product writes a new buffer (the trainer sets
        # gradients to None every step); a tied weight's second one adds into it.
        fresh = min(2, sum(1 for p in params if len(p.shape) == 2))  # weight matrices
        gemms = [Gemm(rows, local_hidden, inputs, 2 * evaluations, layout="nt"),  # x W^T, g W^T
                 Gemm(rows, inputs, local_hidden, evaluations, layout="nn"),      # h W
                 Gemm(local_hidden, inputs, rows, fresh * evaluations, layout="tn"),  # h^T g
                 Gemm(local_hidden, inputs, rows, (2 - fresh) * evaluations, layout="tn+")]
        transfers = []
        if model_ranks > 1:
            transfers.append(Transfer("all_reduce", "model",
                                      ring_all_reduce(model_ranks, FP32 * rows * inputs), evaluations))
            scalars = learner.summed_scalars(config, rows)
            if scalars:
                transfers.append(Transfer("all_reduce", "model",
                                          ring_all_reduce(model_ranks, FP32 * scalars), evaluations))
            if config.optimizer.name == "lbfgs":
                sharded = sum(p.numel for p in params if p.sharded)
                transfers.append(Transfer("all_gather", "model",
                                          ring_all_gather(model_ranks, FP32 * sharded), evaluations))
        # Split over the model axis, every parameter is a DTensor (terabrain.parallel.
        # hidden_unit_plan), which decides whether the optimizer's update is fused.
        # A weight split over the model axis is a DTensor, reduced whole.
        tensors = [(local_of[p.name], p.shape[-1] if p.in_blocks and model_ranks == 1 else 0)
                   for p in params]
        step = assemble_step(config, data_ranks, rows, gemms, elementwise, evaluations, local,
                             logged, transfers, over_dtensors=model_ranks > 1, tensors=tensors)
        if model_ranks > 1:  # the units split over the model axis are DTensors
            step.sharded_evaluations = evaluations
        return step

    return work
