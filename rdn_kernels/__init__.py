"""rdn_kernels: nested (block-lower-triangular) convolution and linear ops for Russian doll networks.

Knows nothing about models; see :mod:`rdn` for those.
"""

from rdn_kernels.backends import BackendUnavailableError, available_backends
from rdn_kernels.layout import NestedLayout, check_stages, make_layout
from rdn_kernels.nested_conv import nested_conv2d, nested_conv2d_reference, nested_linear

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "NestedLayout",
    "available_backends",
    "check_stages",
    "make_layout",
    "nested_conv2d",
    "nested_conv2d_reference",
    "nested_linear",
]
