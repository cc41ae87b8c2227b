"""softswitch: a SIP-native softswitch and CTI engine."""

__version__ = "0.1.0"
