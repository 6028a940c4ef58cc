"""A CPU-only tour of RMDA in about half a minute: ``python -m rmda_fused.demo``.

The ``--preset digits`` run of the training entry point (``python -m rmda_fused.train``): a
small CNN on scikit-learn's bundled 8x8 digits images (1,797 real images that ship inside
scikit-learn: nothing is downloaded), trained with :class:`rmda_fused.RMDA` and input-channel
group LASSO (100 epochs, lr 0.1, c 0.1, lam 1e-3, batch 64, one restart at 60% of the epochs
with the ICLR'22 momentum schedule, one thread). One line per epoch:

- ``loss``, ``test acc``: mean training loss, test accuracy of the current iterate W;
- ``sparsity z`` / ``W``: fraction of input-channel groups (one per input channel of a conv,
  one per column of a linear layer) exactly zero in the prox point z and in the weights W.
  RMDA's theorem is about z; W = (1-c) W + c z becomes exactly sparse once c reaches 1,
  which the restart arranges (c / 0.1 = 1);
- ``c``: the momentum; ``flips`` / ``last change``: how many groups of z switched between zero
  and non-zero since the previous epoch, and the last epoch at which any did.

At the end ``optimizer.apply_prox_point()`` sets every weight to z, and the exactly
structured model's test accuracy (about 97%) and sparsity (40-50% of the groups) are
printed. Every flag of ``python -m rmda_fused.train`` works here (``--epochs 20``,
``--output DIR`` for checkpoints, log and plots, ``--export-slim`` ...). ``main(argv)``
returns the final metrics.
"""
from __future__ import annotations

import sys
from typing import Any

from .train import run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(["--preset", "digits", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
