"""The steering runtime: energy models and the harm gate at inference, settings, the artefact format and
`Steering`. It imports only els.core: serving a model never loads training, data or judges."""

from els.steering.artefact import Artefact
from els.steering.energy import EnergyMember, EnergyStack
from els.steering.gate import HarmGate
from els.steering.settings import SteerSettings
from els.steering.steering import Steering, steer

__all__ = ["Artefact", "EnergyMember", "EnergyStack", "HarmGate", "SteerSettings", "Steering", "steer"]
