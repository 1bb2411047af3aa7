"""splitwire.split."""
