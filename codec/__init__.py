"""splitwire.codec."""
