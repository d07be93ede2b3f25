"""Root of the edgepack exception tree.

It lives in the device runtime because the runtime installs alone and must never
import the workstation package; ``edgepack.errors`` re-exports these classes and adds
the workstation branches, so there is one tree with one root.
"""

from __future__ import annotations


class EdgepackError(Exception):
    """Base class of every error edgepack raises on purpose.

    Messages are full sentences that say what to do next, because command-line tools
    print them as the only line a user sees.

    Attributes:
        exit_code: Process exit code for this error (2: bad input, 1: a check or gate
            that ran and failed).
    """

    exit_code = 2


class BundleError(EdgepackError):
    """A bundle is malformed, oversized, or unsafe to unpack."""


class VerificationError(EdgepackError):
    """A signature, a hash or a golden-vector self-test did not match."""

    exit_code = 1


class DownloadError(EdgepackError):
    """Fetching a bundle or a delta failed."""


class UpdateError(EdgepackError):
    """An over-the-air update could not be applied."""
