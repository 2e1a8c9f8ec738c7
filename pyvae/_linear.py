"""Where ``fused_only`` lived before the op library became the ``pyvae.ops`` subpackage; kept so that
scripts calling ``pyvae._linear.fused_only()`` keep working. New code: ``pyvae.ops.fused_only``."""
from .ops import fused_only

__all__ = ["fused_only"]
