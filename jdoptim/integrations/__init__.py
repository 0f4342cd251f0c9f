"""Optional integrations with the trainers that write the training loop for you.

* :mod:`jdoptim.integrations.lightning`: ``JacobianDescentModule`` for PyTorch Lightning
  (``pip install jdoptim[lightning]``).
* :mod:`jdoptim.integrations.accelerate`: ``backward`` for Hugging Face accelerate
  (``pip install jdoptim[accelerate]``).

Neither is imported by ``import jdoptim``: each imports its trainer only when imported itself.
"""
