"""c2cserve placer."""
