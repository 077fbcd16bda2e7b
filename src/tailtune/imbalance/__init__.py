"""Class-imbalance corrections: re-weighted / margin / prior-adjusted losses and epoch samplers."""
