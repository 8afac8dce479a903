"""The tiers' logic, free of Ray: the device drafter (runs the speculative loop) and the edge
verifier (holds session KV state). Ray Serve deployments wrap these classes."""
