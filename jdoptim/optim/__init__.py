"""Jacobian-descent optimizers: ``step(closure)`` computes the losses' Gramian or Jacobian, combines
it into ``.grad`` and lets a torch optimizer update the parameters."""

from jdoptim.optim._options import JDOptions
from jdoptim.optim.jacobian_descent import JacobianDescent
from jdoptim.optim.jdadam import JDAdam
from jdoptim.optim.jdadamw import JDAdamW
from jdoptim.optim.jdsgd import JDSGD

__all__ = ["JDSGD", "JDAdam", "JDAdamW", "JDOptions", "JacobianDescent"]
