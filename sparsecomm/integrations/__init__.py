"""Glue to other trainers (optional extras): `sparsecomm.integrations.trl` for transformers/TRL Trainers."""
