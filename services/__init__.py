"""c2cserve services."""
