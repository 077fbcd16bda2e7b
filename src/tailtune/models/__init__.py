"""LightningModules for the transfer approaches. None of them knows Hydra."""
