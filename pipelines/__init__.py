"""msrface package."""
