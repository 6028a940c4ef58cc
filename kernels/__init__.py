"""Triton kernels of rmda-fused (installed as ``rmda_fused.kernels``).

One kernel family per module, each with its Python wrapper beside it:

- :mod:`.rmda_scalars`: per-tensor t, A and the step's scalars, as helpers the element
  kernels call and as a launch of its own that fills a scratch table;
- :mod:`.rmda_elementwise`: grouping ``none`` and ``elementwise`` (L1);
- :mod:`.rmda_grouped`: ``input_channel`` / ``output_channel`` group LASSO.

The step wrappers take a :class:`rmda_fused.batch.StepBatch` of one bucket (one device, one
dtype per list, see ``StepBatch.buckets``) and make one launch for all of it.
"""
from .rmda_coupled import rmda_apply_step_, rmda_partials_step_
from .rmda_elementwise import rmda_elementwise_step_
from .rmda_grouped import rmda_grouped_step_
from .rmda_scalars import rmda_scalars_

__all__ = ["rmda_elementwise_step_", "rmda_grouped_step_", "rmda_scalars_",
           "rmda_partials_step_", "rmda_apply_step_"]


def interpreted() -> bool:
    """Whether these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when
    triton decorated them): then they take CPU tensors only, else CUDA tensors only."""
    from triton.runtime.interpreter import InterpretedFunction

    from .rmda_grouped import _rmda_grouped_kernel

    return isinstance(_rmda_grouped_kernel, InterpretedFunction)
