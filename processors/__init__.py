"""Stream processors: identity, autopilots and linkage policies, and their runner."""
