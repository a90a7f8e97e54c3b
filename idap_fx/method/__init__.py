"""Method: the IDAP++ decisions: statistics, divergence scores, allocation, schedule, budget, recovery."""
