"""Small rubric datasets in every supported format (package data)."""
