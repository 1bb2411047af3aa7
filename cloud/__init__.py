"""splitwire.cloud."""
