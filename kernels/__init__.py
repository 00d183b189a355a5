"""Triton kernels for mono_quant's statistics, installed as ``mono_quant.kernels``.

Imports torch and triton, never mono_quant; importing this package raises ImportError when triton is
missing, which ``mono_quant.ops`` reports as "the Triton backend is not available". Each public function
has a twin with the same signature and result in ``mono_quant.reference``.
"""

from .histogram import histogram_update_
from .minmax import minmax_per_channel_update_, minmax_update_

__all__ = ["histogram_update_", "minmax_per_channel_update_", "minmax_update_"]

from .amax import amax_history_update_  # noqa: E402

__all__ += ["amax_history_update_"]

from .fake_quant import fake_quantize_  # noqa: E402

__all__ += ["fake_quantize_"]

from .fake_quant import amax_history_fake_quantize_, observe_fake_quantize_  # noqa: E402

__all__ += ["amax_history_fake_quantize_", "observe_fake_quantize_"]


# block formats (issue 16)
from .blocks import block_amax_update_, block_fake_quantize  # noqa: E402

__all__ += ["block_amax_update_", "block_fake_quantize"]


# segmented observation (MoE experts, issue 15)
from .segment_histogram import histogram_segments_update_  # noqa: E402
from .segments import minmax_segments_update_  # noqa: E402

__all__ += ["histogram_segments_update_", "minmax_segments_update_"]
