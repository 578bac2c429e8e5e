"""The one exception family of udfc-ref.

Every failure a user can cause (a bad file, a bad graph, bad numbers, a bad
option) is raised as a subclass of :class:`UDFCError` whose message names the
tensor, node or option concerned.  Anything else escaping the library is a bug.
"""

from __future__ import annotations


class UDFCError(Exception):
    """Base class of every error udfc-ref raises on purpose."""


class FormatError(UDFCError):
    """A model file is unreadable, truncated, or not a udfc-ref file."""


class GraphError(UDFCError):
    """The node list is not a valid graph: unknown op, dangling input, cycle,
    duplicate output, or inconsistent shapes."""


class NumericError(UDFCError):
    """A tensor holds values the math cannot use: NaN/Inf, negative variance,
    a zero denominator."""


class OptionError(UDFCError):
    """A compression or CLI option is out of range or names nothing."""


class ConversionError(UDFCError):
    """A framework model holds a layer or layout the converter cannot map."""
