"""Error-feedback rules for biased compressors (top-k): EF14, EF21, EF21-SGDM and EControl.

A rule is the state machine of *one layer on one rank*. It knows nothing about buckets, messages
or process groups; the hook hands it flat tensors and does the communication:

1. ``message_input(gradient, stored)``: the vector this rank compresses and sends;
2. the hook compresses it, exchanges messages and decodes them into ``own`` (this rank's message,
   decoded locally) and ``mean`` (the average of every rank's decoded message, summed in rank
   order, so bitwise identical on every rank);
3. ``update(stored, exchange)``: the new stored tensors and the averaged gradient to apply.

Why ``own`` is the *decoded* message and not ``C(x)`` computed in full precision: with float16 or
bfloat16 values on the wire, the receivers see rounded values. Using the same rounded values for
the sender's own state keeps the replicated estimate equal to the mean of the local estimates,
and makes the residual of EF14/EControl include the rounding error (so it is fed back too).

Stored tensors, by name (flat, same dtype as the gradient):

- ``"error"``: per rank, what was not sent yet (EF14's ``e``, EControl's ``e_i``);
- ``"local_estimate"``: per rank, this rank's running gradient estimate (EF21's ``g_i``,
  EControl's ``h_i``);
- ``"momentum"``: per rank, EF21-SGDM's running average of this rank's gradients (``v_i``);
- ``"estimate"``: replicated, the mean of the local estimates (EF21's ``g``, EControl's ``h``);
  it is the gradient the optimizer sees and must be bitwise identical on every rank.

Rules never modify their arguments in place and never keep references to them: the hook commits
the returned tensors only if the whole step turns out finite.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

ERROR = "error"
LOCAL_ESTIMATE = "local_estimate"
ESTIMATE = "estimate"
MOMENTUM = "momentum"

Stored = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Exchange:
    """What one compressed step of one layer produced, as seen by this rank."""

    gradient: torch.Tensor  # this rank's gradient of the layer
    sent: torch.Tensor  # the vector this rank compressed (``message_input``'s result)
    own: torch.Tensor  # this rank's compressed message, decoded: C(sent)
    mean: torch.Tensor  # (1 / world) * sum over ranks of their decoded messages


@dataclass(frozen=True)
class FeedbackUpdate:
    """A rule's answer for one step: tensors to store (replacing the old ones) and the output."""

    stored: dict[str, torch.Tensor]
    output: torch.Tensor


class FeedbackRule(ABC):
    """One error-feedback algorithm. Subclasses are small frozen dataclasses (their fields are
    hyperparameters; all state lives in the ``stored`` mappings the hook keeps per layer)."""

    name: ClassVar[str]
    per_rank_tensors: ClassVar[tuple[str, ...]]
    replicated_tensors: ClassVar[tuple[str, ...]]
    # Estimator rules start by default from an exact, uncompressed average (``start="dense"``):
    # from a zero estimate a top-k message moves 1 % of its entries a step, so the first steps would
    # crawl towards the true gradient; and sending C(g) while storing g (as some reference code
    # does) would split the senders' and receivers' estimates. ``start="zero"`` starts every
    # estimate at zero on every rank instead, for compressors that send every entry (one-bit
    # quantization), so that no step costs full bytes.
    needs_dense_init: ClassVar[bool] = False
    start = "dense"  # an estimator rule's field: "dense" or "zero"

    def holds_state(self, stored: Stored) -> bool:
        """For an estimator rule, whether the layer holds its estimates (every rank must agree:
        a replicated estimate held by some ranks only would split their parameters)."""
        return not self.needs_dense_init or all(key in stored for key in self.per_rank_tensors + self.replicated_tensors)

    def is_initialised(self, stored: Stored) -> bool:
        """True when the layer can take a compressed step (else the hook runs :meth:`dense_init`)."""
        return self.start == "zero" or self.holds_state(stored)

    def started(self, like: torch.Tensor, stored: Stored) -> Stored:
        """``stored`` with a zero tensor for each one missing (``start="zero"``: the first
        compressed step of a layer starts from zero estimates)."""
        missing = [key for key in self.per_rank_tensors + self.replicated_tensors if key not in stored]
        return {**stored, **{key: torch.zeros_like(like) for key in missing}} if missing else stored

    def dense_init(self, gradient: torch.Tensor, mean_gradient: torch.Tensor) -> dict[str, torch.Tensor]:
        """State after a step in which the layer's gradient was averaged uncompressed (the
        output of that step is ``mean_gradient``). Only called when ``needs_dense_init``."""
        raise RuntimeError(f"feedback rule {self.name!r} has no dense initialisation (needs_dense_init is False)")

    def uncompressed_input(self, gradient: torch.Tensor, stored: Stored) -> torch.Tensor:
        """What this rank contributes when the layer is averaged uncompressed (too small to be
        worth compressing at its density)."""
        return gradient

    def after_uncompressed(self, sent: torch.Tensor, stored: Stored) -> dict[str, torch.Tensor]:
        """The tensors to keep after the layer was averaged uncompressed (``sent`` is what
        :meth:`uncompressed_input` returned); every other stored tensor of the layer is dropped."""
        return {}

    @abstractmethod
    def message_input(self, gradient: torch.Tensor, stored: Stored) -> torch.Tensor:
        """The vector this rank compresses and sends this step."""

    @abstractmethod
    def update(self, stored: Stored, exchange: Exchange) -> FeedbackUpdate:
        """New stored tensors and the averaged gradient, once the messages are exchanged."""


@dataclass(frozen=True)
class EF14(FeedbackRule):
    """Classic error feedback (Seide et al. 2014; Stich et al. 2018).

    ``v = g + e``; send ``C(v)``; ``e <- v - C(v)``; output ``mean_i C(v_i)``. The residual starts at
    zero, so no dense initialisation is needed.
    """

    name: ClassVar[str] = "ef14"
    per_rank_tensors: ClassVar[tuple[str, ...]] = (ERROR,)
    replicated_tensors: ClassVar[tuple[str, ...]] = ()

    def uncompressed_input(self, gradient: torch.Tensor, stored: Stored) -> torch.Tensor:
        # Sending v = g + e uncompressed leaves a zero residual: nothing that was held back is lost.
        return self.message_input(gradient, stored)

    def message_input(self, gradient: torch.Tensor, stored: Stored) -> torch.Tensor:
        error = stored.get(ERROR)
        return gradient if error is None else gradient + error

    def update(self, stored: Stored, exchange: Exchange) -> FeedbackUpdate:
        return FeedbackUpdate(stored={ERROR: exchange.sent - exchange.own}, output=exchange.mean)


@dataclass(frozen=True)
class EF21(FeedbackRule):
    """EF21 (Richtárik, Sokolov, Fatkhullin, NeurIPS 2021): compress the *change* of the gradient.

    Send ``c_i = C(g_i' - g_i)``; ``g_i <- g_i + c_i``; ``g <- g + mean_i c_i``; output ``g``. The
    replicated ``g`` is updated incrementally (not recomputed), so it stays identical on every rank.
    """

    name: ClassVar[str] = "ef21"
    per_rank_tensors: ClassVar[tuple[str, ...]] = (LOCAL_ESTIMATE,)
    replicated_tensors: ClassVar[tuple[str, ...]] = (ESTIMATE,)
    needs_dense_init: ClassVar[bool] = True

    start: str = "dense"

    def __post_init__(self) -> None:
        check_start(self.start)

    def dense_init(self, gradient: torch.Tensor, mean_gradient: torch.Tensor) -> dict[str, torch.Tensor]:
        return {LOCAL_ESTIMATE: gradient.clone(), ESTIMATE: mean_gradient.clone()}

    def message_input(self, gradient: torch.Tensor, stored: Stored) -> torch.Tensor:
        return gradient - self.started(gradient, stored)[LOCAL_ESTIMATE]

    def update(self, stored: Stored, exchange: Exchange) -> FeedbackUpdate:
        stored = self.started(exchange.gradient, stored)
        estimate = stored[ESTIMATE] + exchange.mean
        return FeedbackUpdate(
            stored={LOCAL_ESTIMATE: stored[LOCAL_ESTIMATE] + exchange.own, ESTIMATE: estimate},
            output=estimate,
        )


@dataclass(frozen=True)
class EF21SGDM(FeedbackRule):
    """EF21-SGDM (Fatkhullin, Tyurin, Richtárik, "Momentum provably improves error feedback!",
    NeurIPS 2023): EF21 tracking a local momentum instead of the raw stochastic gradient.

    ``v_i <- beta v_i + (1 - beta) g_i'``; send ``c_i = C(v_i - g_i)``; ``g_i <- g_i + c_i``;
    ``g <- g + mean_i c_i``; output ``g``. Why: with minibatch gradients EF21's estimate chases the
    sampling noise, and at 1 % density it can only move 1 % of its entries per step; ``v_i``
    averages that noise away, so the estimate tracks a target that moves slowly. ``beta = 0`` is
    EF21 bit for bit. The output is an average of recent gradients (not a sum), so learning rates
    tuned for uncompressed training keep their scale. Its momentum replaces the optimizer's: with
    SGD, step momentum-free SGD at ``lr / (1 - momentum)`` (SGD with momentum at ``lr`` when
    nothing is compressed); after AdamW preconditioning, give the local AdamW a first beta of 0
    (``LocalAdamW(betas=(0.0, 0.999))``). On top of another momentum it is a second average, and
    trained worse in benchmarks/RESULTS.md §3b and §3i.
    """

    name: ClassVar[str] = "ef21-sgdm"
    per_rank_tensors: ClassVar[tuple[str, ...]] = (MOMENTUM, LOCAL_ESTIMATE)
    replicated_tensors: ClassVar[tuple[str, ...]] = (ESTIMATE,)
    needs_dense_init: ClassVar[bool] = True

    momentum: float = 0.9
    start: str = "dense"

    def __post_init__(self) -> None:
        check_momentum(self.momentum)
        check_start(self.start)

    def dense_init(self, gradient: torch.Tensor, mean_gradient: torch.Tensor) -> dict[str, torch.Tensor]:
        return {MOMENTUM: gradient.clone(), LOCAL_ESTIMATE: gradient.clone(), ESTIMATE: mean_gradient.clone()}

    def _averaged(self, gradient: torch.Tensor, stored: Stored) -> torch.Tensor:
        if self.momentum == 0.0:
            return gradient
        return torch.lerp(stored[MOMENTUM], gradient, 1.0 - self.momentum)

    def message_input(self, gradient: torch.Tensor, stored: Stored) -> torch.Tensor:
        stored = self.started(gradient, stored)
        return self._averaged(gradient, stored) - stored[LOCAL_ESTIMATE]

    def uncompressed_input(self, gradient: torch.Tensor, stored: Stored) -> torch.Tensor:
        # A layer sent dense still averages momenta, not raw gradients: the rule keeps its meaning
        # whichever path min_compression_rate puts a layer on (and costs no extra bytes).
        return self._averaged(gradient, stored) if MOMENTUM in stored else gradient

    def after_uncompressed(self, sent: torch.Tensor, stored: Stored) -> dict[str, torch.Tensor]:
        return {MOMENTUM: sent.clone()}

    def update(self, stored: Stored, exchange: Exchange) -> FeedbackUpdate:
        # Recomputed rather than carried over from message_input: the same operation on the same
        # inputs gives the same bits, and rules keep no state between the two calls.
        stored = self.started(exchange.gradient, stored)
        averaged = self._averaged(exchange.gradient, stored)
        estimate = stored[ESTIMATE] + exchange.mean
        return FeedbackUpdate(
            stored={
                MOMENTUM: averaged.clone() if averaged is exchange.gradient else averaged,
                LOCAL_ESTIMATE: stored[LOCAL_ESTIMATE] + exchange.own,
                ESTIMATE: estimate,
            },
            output=estimate,
        )


@dataclass(frozen=True)
class EControl(FeedbackRule):
    """EControl (Gao, Islamov, Stich, ICLR 2024): EF21's estimator plus a damped error feedback.

    ``D_i = C(eta * e_i + g_i - h_i)``; ``e_i <- e_i + g_i - h_i - D_i``; ``h_i <- h_i + D_i``;
    ``h <- h + mean_i D_i``; output ``h``. The residual accumulates in full but is fed back with
    strength ``eta``; with ``eta = 0`` the message and estimates are exactly EF21's.
    """

    name: ClassVar[str] = "econtrol"
    per_rank_tensors: ClassVar[tuple[str, ...]] = (ERROR, LOCAL_ESTIMATE)
    replicated_tensors: ClassVar[tuple[str, ...]] = (ESTIMATE,)
    needs_dense_init: ClassVar[bool] = True

    eta: float = 0.1
    start: str = "dense"

    def __post_init__(self) -> None:
        check_eta(self.eta)
        check_start(self.start)

    def dense_init(self, gradient: torch.Tensor, mean_gradient: torch.Tensor) -> dict[str, torch.Tensor]:
        return {ERROR: torch.zeros_like(gradient), LOCAL_ESTIMATE: gradient.clone(), ESTIMATE: mean_gradient.clone()}

    def message_input(self, gradient: torch.Tensor, stored: Stored) -> torch.Tensor:
        stored = self.started(gradient, stored)
        message = gradient - stored[LOCAL_ESTIMATE]
        if self.eta != 0.0:  # eta = 0 sends EF21's message bit for bit
            message.add_(stored[ERROR], alpha=self.eta)
        return message

    def update(self, stored: Stored, exchange: Exchange) -> FeedbackUpdate:
        stored = self.started(exchange.gradient, stored)
        innovation = exchange.gradient - stored[LOCAL_ESTIMATE]
        estimate = stored[ESTIMATE] + exchange.mean
        return FeedbackUpdate(
            stored={
                ERROR: stored[ERROR] + innovation - exchange.own,
                LOCAL_ESTIMATE: stored[LOCAL_ESTIMATE] + exchange.own,
                ESTIMATE: estimate,
            },
            output=estimate,
        )


FEEDBACK_NAMES: tuple[str, ...] = (EF14.name, EF21.name, EF21SGDM.name, EControl.name)


def check_eta(eta: object) -> None:
    """EControl's feedback strength must be a finite number >= 0."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0 (EControl's feedback strength, default 0.1); got {eta!r}")


def check_momentum(momentum: object) -> None:
    """EF21-SGDM's momentum must be a number in [0, 1)."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (0 <= momentum < 1):
        raise ValueError(f"momentum must be a number in [0, 1) (EF21-SGDM's averaging factor, default 0.9); got {momentum!r}")


ESTIMATE_STARTS: tuple[str, ...] = ("dense", "zero")


def check_start(start: object) -> None:
    """How an estimator rule's estimates start: ``"dense"`` or ``"zero"``."""
    if not isinstance(start, str) or start not in ESTIMATE_STARTS:
        raise ValueError(
            f"estimate_start must be one of {list(ESTIMATE_STARTS)} (EF21 / EF21-SGDM / EControl: from one exact dense "
            f"average, or from zero with every step compressed); got {start!r}"
        )


def make_feedback_rule(name: str, *, eta: float = 0.1, momentum: float = 0.9, start: str = "dense") -> FeedbackRule:
    """The rule called ``name`` (one of :data:`FEEDBACK_NAMES`); ``eta`` is used by EControl only,
    ``momentum`` by EF21-SGDM only, ``start`` by the estimator rules only (each is checked whatever
    the rule)."""
    if not isinstance(name, str):
        raise TypeError(f"feedback must be a string, one of {list(FEEDBACK_NAMES)}; got {name!r}")
    check_eta(eta)
    check_momentum(momentum)
    check_start(start)
    if name == EF14.name:
        return EF14()
    if name == EF21.name:
        return EF21(start=start)
    if name == EF21SGDM.name:
        return EF21SGDM(momentum=float(momentum), start=start)
    if name == EControl.name:
        return EControl(eta=float(eta), start=start)
    raise ValueError(f"unknown feedback {name!r}; choose one of {list(FEEDBACK_NAMES)}")
