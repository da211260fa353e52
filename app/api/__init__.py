"""HTTP layer: dependencies and one route module per resource."""
