"""c2cserve worker."""
