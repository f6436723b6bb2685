"""c2cserve bench."""
