"""Agent items: the CLI profiles (``profiles``), reading their event streams (``stream``), and the
item body that retries and resumes (``job``)."""
