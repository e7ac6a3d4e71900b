"""`make bench`: every serving figure of the project, measured side by side in one run."""
