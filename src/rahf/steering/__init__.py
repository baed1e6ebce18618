"""Steering: read preference directions layer by layer, add them at inference, export, compose.

* ``rahf scan`` (:mod:`rahf.steering.scan`): per ``hidden_states`` layer, how consistently the
  preferred-minus-dispreferred pattern points one way, and from that a target band and strength.
* ``rahf steer`` (:mod:`rahf.steering.steer`): add the mean difference to the residual stream
  during generation through forward hooks (no training).
* :mod:`rahf.steering.control_vector`: vector files (safetensors) and llama.cpp control-vector
  GGUF export.
* ``rahf compose`` (:mod:`rahf.steering.compose`): weighted sums of vectors and of LoRA adapters.
"""

from rahf.steering.control_vector import SteeringVectors, load_vectors
from rahf.steering.steer import steering

__all__ = ["SteeringVectors", "load_vectors", "steering"]
