"""c2cserve controller."""
