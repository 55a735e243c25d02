"""User-facing errors. Each says what is wrong, with which thing, and how to fix it.

The pytest plumbing turns these into one clear line (no traceback): a user mistake is not
a crash of the suite.
"""


class PdperfError(Exception):
    """Base class: an error whose message is meant for the user, complete as it is."""


class SpecError(PdperfError):
    """A topology, workload or SLO file that is invalid."""


class ClusterError(PdperfError):
    """The cluster cannot be reached or cannot hold what was asked."""


class DeployError(PdperfError):
    """A topology did not become ready; the message carries what was awaited and log lines."""


class ModelError(PdperfError):
    """A model folder is missing or incomplete."""
