"""Running a job: read → prompts → engine → sink, with progress reporting."""
