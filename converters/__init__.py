"""Framework converters (optional extras).

``converters.torch`` and ``converters.keras`` import their framework lazily;
this package imports without either installed.
"""
