"""c2cserve gateway."""
