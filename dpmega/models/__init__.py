"""Models trained by dpmega tasks: BERT masked LM, CTR models."""
