"""Pretraining streams: sources, token packing cache, mixture sampling, batch schedule and ``PretrainDataModule``."""
