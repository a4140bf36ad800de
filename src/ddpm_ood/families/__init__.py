"""Score families (placeholder until merged)."""
