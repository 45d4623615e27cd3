"""The operator command line of the mirrored-collateral bridge (``mcb``)."""
