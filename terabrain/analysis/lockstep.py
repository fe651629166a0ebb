"""Several iterative solvers whose objective evaluations are answered together.

Each solver runs in its own thread and calls ``evaluate(arguments)`` as usual (for example
inside a ``torch.optim.LBFGS`` closure); the call blocks until every solver that has not
finished has asked too, and one call of ``batch`` then answers all of them. Each solver's
sequence of evaluations, and so its result, is the one it would have on its own: only the
order of the work changes. What it buys: problems that read the same large matrix (the
probe's features under several L2 penalties) read it once per round instead of once each.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

Result = TypeVar("Result")
Evaluate = Callable[[Any], Any]


class LockstepFailure(RuntimeError):
    """Another solver's evaluation failed; this solver stops too."""


def run_in_lockstep(solvers: Sequence[Callable[[Evaluate], Result]],
                    batch: Callable[[dict[int, Any]], dict[int, Any]]) -> list[Result]:
    """Run ``solvers[i](evaluate)`` for every i, each in a thread; ``batch({i: arguments})``
    answers one round of asks (it must return an answer for every key) and runs on the
    thread of the solver that asked last. The first error, in a solver or in ``batch``,
    stops every solver at its next ask and is raised here."""
    condition = threading.Condition()
    unfinished = set(range(len(solvers)))
    asked: dict[int, Any] = {}
    answers: dict[int, Any] = {}
    errors: list[BaseException] = []

    def answer_when_everyone_asked() -> None:  # called with the condition held
        if not asked or len(asked) < len(unfinished):
            return
        if errors:  # nobody is answered: every waiting solver stops
            asked.clear()
            condition.notify_all()
            return
        try:
            answers.update(batch(dict(asked)))
        except BaseException as error:  # noqa: BLE001 - re-raised by run_in_lockstep
            errors.append(error)
        asked.clear()
        condition.notify_all()

    def solve(index: int) -> Result:
        def evaluate(arguments: Any) -> Any:
            with condition:
                if errors:
                    raise LockstepFailure("another solver failed")
                asked[index] = arguments
                answer_when_everyone_asked()
                condition.wait_for(lambda: index in answers or bool(errors))
                if index in answers:
                    return answers.pop(index)
                raise LockstepFailure("another solver failed")

        try:
            return solvers[index](evaluate)
        except BaseException as error:
            with condition:
                if not isinstance(error, LockstepFailure):
                    errors.append(error)
                    condition.notify_all()
            raise
        finally:
            with condition:
                unfinished.discard(index)
                asked.pop(index, None)
                answer_when_everyone_asked()

    if len(solvers) == 1:  # no thread needed: every ask is a whole round
        return [solve(0)]
    with ThreadPoolExecutor(len(solvers), thread_name_prefix="lockstep") as pool:
        futures = [pool.submit(solve, i) for i in range(len(solvers))]
        for future in futures:
            future.exception()  # wait for all of them
    if errors:
        raise errors[0]
    return [future.result() for future in futures]
