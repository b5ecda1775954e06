"""End-to-end inference: an official XML file in, the two submission files out."""
