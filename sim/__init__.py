"""c2cserve sim."""
