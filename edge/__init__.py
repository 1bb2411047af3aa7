"""splitwire.edge."""
