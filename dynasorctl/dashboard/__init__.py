"""`dynasorctl dashboard`: a Textual view of live traffic, requests, probes and rollout."""
