"""Neural-network building blocks: backbones, the fused batch norm, losses and ramp-ups."""
