"""ENHANCEDSTATUSCODES (RFC 2034): RFC 3463 codes prefix reply text.

Rendering happens in the connection: once EHLO advertised this extension,
every reply except the banner and the HELO/EHLO reply carries its enhanced
code (RFC 2034 section 3).
"""

from __future__ import annotations

from ..protocol import Extension


class EnhancedStatusCodes(Extension):
    """Advertise ENHANCEDSTATUSCODES."""

    keyword = "ENHANCEDSTATUSCODES"
    enables_enhanced_codes = True
