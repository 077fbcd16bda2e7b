"""Console entry points. Hydra lives here and in configs/, nowhere below."""
