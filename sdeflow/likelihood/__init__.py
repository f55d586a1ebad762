"""Likelihoods of a model: the ELBO of the plug-in reverse SDE with its time proposals
(:mod:`~sdeflow.likelihood.elbo`, :mod:`~sdeflow.likelihood.time_proposals`), the probability-flow
ODE's exact log-density (:mod:`~sdeflow.likelihood.ode`, Hutchinson or exact divergences from
:mod:`~sdeflow.likelihood.divergence`), what to estimate (:mod:`~sdeflow.likelihood.settings`), and
likelihoods over data sets in nats or bits/dim with their standard errors and tail diagnostics
(:mod:`~sdeflow.likelihood.evaluation`, :mod:`~sdeflow.likelihood.statistics`), and the classifier a
class-conditional model is, p(y | x) from its ELBOs (:mod:`~sdeflow.likelihood.classifier`). DDPM's discrete-time
bound lives with DDPM's chain in :mod:`sdeflow.discrete`."""

from .plans import EstimatorPlan
from .time_proposals import FittedTime, ImportanceTime, TimeProposal, UniformTime
from .elbo import elbo, fit_time_proposal
from .divergence import divergence
from .ode import log_prob_ode, sample_ode
from .settings import LikelihoodSettings
from .evaluation import evaluate_bpd, log_likelihood
from .classifier import class_elbos, classify, fit_class_plan

__all__ = ["TimeProposal", "UniformTime", "ImportanceTime", "FittedTime", "EstimatorPlan", "elbo", "fit_time_proposal", "divergence",
           "log_prob_ode", "sample_ode", "LikelihoodSettings", "log_likelihood", "evaluate_bpd",
           "class_elbos", "classify", "fit_class_plan"]
