"""Latent Preference Coding (LPC): DPO, SimPO and IPO with discrete latent codes."""

__version__ = "0.1.0"
